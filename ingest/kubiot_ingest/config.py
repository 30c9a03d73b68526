"""Configuration from the environment (prefix `KUBIOT_INGEST_`), validated once at start."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kubiot_contract.health import AnomalyRules, parse_rules
from kubiot_contract.telemetry import DEFAULT_MAX_PAYLOAD_BYTES
from kubiot_contract.topics import ContractError, ingest_client_id, validate_name

ENV_PREFIX = "KUBIOT_INGEST_"
SCHEMA_PATTERN = r"^[a-z_][a-z0-9_]{0,62}$"


class ConfigError(ValueError):
    """The environment does not describe a runnable ingest service."""


class IngestSettings(BaseSettings):
    """Everything the ingest service reads from its environment."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    tenant: str
    broker_host: str = "127.0.0.1"
    broker_port: int = Field(1883, ge=1, le=65535)
    broker_username: str | None = None
    broker_password: SecretStr | None = None
    broker_tls_ca_file: str | None = None
    broker_tls_cert_file: str | None = None
    broker_tls_key_file: str | None = None
    broker_keepalive_s: int = Field(30, ge=5, le=3600)
    session_expiry_s: int = Field(3600, ge=0, le=2**32 - 1)
    client_id: str | None = None
    share_group: str | None = None
    database_dsn: SecretStr
    database_schema: Annotated[str, Field(pattern=SCHEMA_PATTERN)] | None = None
    retention_days: int = Field(90, ge=1, le=3650)
    max_future_skew_s: int = Field(3600, ge=0, le=7 * 86400)
    compress_after_days: int = Field(7, ge=1, le=3650)
    partitions_ahead_days: int = Field(2, ge=1, le=60)
    batch_size: int = Field(1000, ge=1, le=50_000)
    batch_max_delay_ms: int = Field(200, ge=1, le=60_000)
    queue_max: int = Field(20_000, ge=1, le=65_535)
    max_payload_bytes: int = Field(DEFAULT_MAX_PAYLOAD_BYTES, ge=64, le=256 * 1024 * 1024)
    metrics_port: int = Field(9464, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    retry_max_delay_s: float = Field(5.0, gt=0, le=300)
    shutdown_timeout_s: float = Field(20.0, gt=0, le=600)
    influx_url: str | None = None
    influx_org: str | None = None
    influx_bucket: str | None = None
    influx_token: SecretStr | None = None
    log_format: str = Field("text", pattern=r"^(text|json)$")
    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    #: The tenant's `spec.anomalies`, as `AnomalyRules.to_json()` writes it.
    anomaly_rules: Annotated[AnomalyRules | None, NoDecode] = None

    @field_validator("tenant")
    @classmethod
    def _tenant_is_a_name(cls, value: str) -> str:
        try:
            return validate_name(value, "tenant")
        except ContractError as exc:
            raise ValueError(str(exc)) from exc

    @field_validator("client_id")
    @classmethod
    def _client_id_is_a_service_id(cls, value: str | None) -> str | None:
        # A client id with a `.` has a device's form; the contract keeps services out of it.
        try:
            return None if value is None else ingest_client_id("x", value)
        except ContractError as exc:
            raise ValueError(str(exc)) from exc

    @field_validator("anomaly_rules", mode="before")
    @classmethod
    def _rules_from_json(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_rules(value) if value.strip() else None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> IngestSettings:
        if self.influx_url and not (self.influx_org and self.influx_bucket):
            raise ValueError("INFLUX_URL needs INFLUX_ORG and INFLUX_BUCKET")
        if bool(self.broker_tls_cert_file) != bool(self.broker_tls_key_file):
            raise ValueError("BROKER_TLS_CERT_FILE and BROKER_TLS_KEY_FILE go together")
        if self.broker_password is not None and not self.broker_username:
            raise ValueError("BROKER_PASSWORD is set but BROKER_USERNAME is not")
        return self

    @property
    def schema_name(self) -> str:
        """The tenant's database schema: `tenant_<name>` unless set."""
        return self.database_schema or "tenant_" + self.tenant.replace("-", "_")

    @property
    def mqtt_client_id(self) -> str:
        return ingest_client_id(self.tenant, self.client_id)

    @property
    def batch_max_delay_s(self) -> float:
        return self.batch_max_delay_ms / 1000.0

    @property
    def active_anomaly_rules(self) -> AnomalyRules | None:
        """The anomaly rules to evaluate, or None when there are none (or they are off)."""
        rules = self.anomaly_rules
        return rules if rules is not None and rules.active else None


def load_settings(environ: Mapping[str, str] | None = None) -> IngestSettings:
    """Read and validate the settings, or raise ConfigError with one line per problem."""
    try:
        if environ is None:
            return IngestSettings()
        values = {
            key[len(ENV_PREFIX):].lower(): value
            for key, value in environ.items() if key.startswith(ENV_PREFIX)
        }
        return IngestSettings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from exc


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(p) for p in error["loc"])
        name = f"{ENV_PREFIX}{field.upper()}" if field else "configuration"
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{name}: {message}")
    return "invalid configuration:\n  " + "\n  ".join(lines)
