"""Operator settings: environment variables (`KUBIOT_*`) over an optional YAML config file.

docs/operator.md has the table; `kubiot-operator --print-settings` shows the values in force.
"""

from __future__ import annotations

import json
import os
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

CONFIG_FILE_VARIABLE = "KUBIOT_CONFIG_FILE"


class BrokerKind(StrEnum):
    MOSQUITTO = "mosquitto"
    EMQX = "emqx"


class OperatorSettings(BaseSettings):
    """Everything the operator can be told; each field is also `KUBIOT_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="KUBIOT_", extra="forbid", frozen=True)

    # Broker administration
    broker: BrokerKind = Field(BrokerKind.MOSQUITTO, description="Broker backend.")
    broker_admin_host: str = Field("127.0.0.1", description="Mosquitto service listener host.")
    broker_admin_port: int = Field(1883, ge=1, le=65535, description="Mosquitto service "
                                   "listener port (MQTT, username and password).")
    broker_admin_username: str = Field("kubiot-operator", description="Dynamic-security "
                                       "admin the operator logs in as.")
    broker_admin_password: SecretStr = Field(SecretStr(""), description="Dynamic-security "
                                             "admin password (from a Secret).")
    emqx_api_url: str = Field("http://emqx-dashboard:18083", description="EMQX REST API base.")
    emqx_api_key: str = Field("", description="EMQX API key name.")
    emqx_api_secret: SecretStr = Field(SecretStr(""), description="EMQX API key secret.")
    # What devices are told
    broker_public_host: str = Field("mqtt.example.com", description="Broker host devices "
                                    "connect to; written into each device Secret.")
    broker_public_port: int = Field(8883, ge=1, le=65535, description="Mutual-TLS port.")
    broker_trust_namespace: str | None = Field(
        None, description="Namespace of the broker's pods, where the operator keeps the "
        "`kubiot-broker-trust` Secret (every tenant CA and CRL) for them to mount; unset: the "
        "operator's own namespace.")
    broker_ca_file: Path | None = Field(None, description="CA that signed the broker's server "
                                        "certificate; written into each device Secret.")
    crl_url_template: str | None = Field(
        None, pattern=r"^https?://[^\s]*\{tenant\}[^\s]*$",
        description="Where brokers that fetch CRLs (EMQX) get a tenant's CRL, with `{tenant}`; "
        "certificates name it as their CRL distribution point. The operator serves "
        "`/crl/<tenant>.crl` on metrics_port. Unset: no distribution point (Mosquitto).")
    # Reconciliation
    resync_period_seconds: float = Field(300.0, ge=5, description="Drift repair interval.")
    max_workers: int = Field(20, ge=1, le=1000, description="Concurrent handlers.")
    status_flush_seconds: float = Field(2.0, ge=0.1, description="Presence/state patches are "
                                        "batched this long.")
    status_patches_per_second: float = Field(50.0, ge=1, description="Rate limit for "
                                             "presence/state status patches.")
    status_health_seconds: float = Field(30.0, ge=0, description="A device's telemetry health "
                                         "(status.health, TelemetryHealthy) is patched at most "
                                         "once per this many seconds.")
    renewal_check_seconds: float = Field(3600.0, ge=10, description="How often each "
                                         "identity's certificate expiry is checked.")
    broker_admin_tls: bool = Field(False, description="Use TLS (system trust, or "
                                   "broker_ca_file) on the broker admin connection.")
    # Ingest Deployments
    ingest_image: str = Field("ghcr.io/kubiot/ingest:0.1.0", description="Default ingest image.")
    platform_database_secret: str = Field("kubiot-database", description="Secret (in each "
                                          "tenant namespace) with the platform DSN.")
    platform_database_key: str = Field("dsn", description="Key of the DSN in that Secret.")
    ingest_monitor_labels: dict[str, str] = Field(
        {}, description="Labels (a JSON object) on each ingest "
        "ServiceMonitor or PodMonitor, such as the `release` label kube-prometheus-stack "
        "selects monitors by.")
    monitoring_namespace: str = Field("monitoring", description="Namespace of the Prometheus "
                                      "that scrapes the ingest; its NetworkPolicy admits it.")
    api_refusal_limit_seconds: float = Field(
        300.0, ge=1, description="/healthz fails once the Kubernetes API has refused the "
        "operator's credentials this long, even after logging in again.")
    # Serving
    metrics_port: int = Field(8080, ge=0, le=65535, description="Prometheus metrics and probes.")
    log_format: str = Field("json", pattern="^(json|text)$", description="json (one object "
                            "per line) or text.")
    namespace: str = Field("kubiot-system", description="Where the operator itself runs.")

    @field_validator("ingest_monitor_labels", mode="before")
    @classmethod
    def _labels_from_json(cls, value: Any) -> Any:
        # The environment gives JSON text; a config file or a caller may give it too.
        return json.loads(value) if isinstance(value, str) else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlFileSource(settings_cls))


class _YamlFileSource(PydanticBaseSettingsSource):
    """Values from the YAML file named by KUBIOT_CONFIG_FILE, below the environment."""

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get(CONFIG_FILE_VARIABLE)
        if not path:
            return {}
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of setting names to values")
        return {str(k).replace("-", "_"): v for k, v in loaded.items()}

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False


def settings_reference() -> str:
    """docs/operator-settings.md: every setting, its variable, default and meaning."""
    lines = [
        "# Operator settings",
        "",
        "<!-- generated by `make crds` from kubiot_operator/settings.py; do not edit -->",
        "",
        "Each setting is read from the environment variable shown, or from the YAML file named by",
        f"`{CONFIG_FILE_VARIABLE}` (keys are the setting names); the environment wins.",
        "`kubiot-operator --print-settings` prints the values in force, secrets masked.",
        "",
        "| variable | default | meaning |",
        "|---|---|---|",
    ]
    for name, field in OperatorSettings.model_fields.items():
        default = field.default
        if isinstance(default, SecretStr):
            default = "(secret)" if default.get_secret_value() else ""
        elif isinstance(default, StrEnum):
            default = default.value
        shown = f"`{default}`" if default not in (None, "") else ""
        lines.append(f"| `KUBIOT_{name.upper()}` | {shown} | {field.description or ''} |")
    return "\n".join(lines) + "\n"
