"""Configuration comes from KUBIOT_INGEST_* variables and is refused with a clear message."""

from __future__ import annotations

import pytest

from kubiot_ingest import main as ingest_main
from kubiot_ingest.config import ConfigError, load_settings

OPERATOR_ENV = {
    # Exactly what the operator's Deployment sets.
    "KUBIOT_INGEST_TENANT": "acme",
    "KUBIOT_INGEST_BROKER_HOST": "broker.kubiot-system.svc",
    "KUBIOT_INGEST_BROKER_PORT": "1883",
    "KUBIOT_INGEST_BROKER_USERNAME": "acme.svc.ingest",
    "KUBIOT_INGEST_BROKER_PASSWORD": "s3cret",
    "KUBIOT_INGEST_DATABASE_DSN": "postgresql://kubiot@db/kubiot",
    "KUBIOT_INGEST_DATABASE_SCHEMA": "tenant_acme",
    "KUBIOT_INGEST_RETENTION_DAYS": "30",
    "KUBIOT_INGEST_COMPRESS_AFTER_DAYS": "3",
    "KUBIOT_INGEST_BATCH_SIZE": "2000",
    "KUBIOT_INGEST_BATCH_MAX_DELAY_MS": "150",
    "KUBIOT_INGEST_MAX_PAYLOAD_BYTES": "65536",
    "KUBIOT_INGEST_METRICS_PORT": "9464",
    "KUBIOT_INGEST_CLIENT_ID": "ingest-acme-7d9f-abcde",
}


def test_the_operators_environment_is_understood() -> None:
    s = load_settings(OPERATOR_ENV)
    assert (s.tenant, s.broker_host, s.broker_port) == ("acme", "broker.kubiot-system.svc", 1883)
    assert s.broker_username == "acme.svc.ingest"
    assert s.broker_password is not None and s.broker_password.get_secret_value() == "s3cret"
    assert s.database_dsn.get_secret_value() == "postgresql://kubiot@db/kubiot"
    assert s.schema_name == "tenant_acme"
    assert (s.retention_days, s.compress_after_days) == (30, 3)
    assert (s.batch_size, s.batch_max_delay_s) == (2000, 0.15)
    assert s.max_payload_bytes == 65536
    assert s.mqtt_client_id == "ingest-acme-7d9f-abcde"
    assert s.influx_url is None
    assert "s3cret" not in repr(s)


def test_defaults_fill_in_what_is_optional() -> None:
    s = load_settings({"KUBIOT_INGEST_TENANT": "my-site",
                       "KUBIOT_INGEST_DATABASE_DSN": "postgresql://db/kubiot"})
    assert s.schema_name == "tenant_my_site"
    assert s.metrics_port == 9464
    assert s.mqtt_client_id == "kubiot-ingest-my-site"
    assert s.queue_max == 20_000


@pytest.mark.parametrize(("change", "complaint"), [
    ({"KUBIOT_INGEST_TENANT": "Not A Name"}, "KUBIOT_INGEST_TENANT"),
    ({"KUBIOT_INGEST_BATCH_SIZE": "0"}, "KUBIOT_INGEST_BATCH_SIZE"),
    ({"KUBIOT_INGEST_BROKER_PORT": "http"}, "KUBIOT_INGEST_BROKER_PORT"),
    ({"KUBIOT_INGEST_DATABASE_SCHEMA": "Robert'); DROP"}, "KUBIOT_INGEST_DATABASE_SCHEMA"),
    ({"KUBIOT_INGEST_DATABASE_DSN": None}, "KUBIOT_INGEST_DATABASE_DSN"),
    ({"KUBIOT_INGEST_INFLUX_URL": "http://influx:8086"}, "INFLUX_ORG"),
    ({"KUBIOT_INGEST_ANOMALY_RULES": '{"bounds": [{"metric": "temp"}]}'},
     "KUBIOT_INGEST_ANOMALY_RULES: invalid anomaly rules: bounds.0: set min, max or both"),
    ({"KUBIOT_INGEST_ANOMALY_RULES": '{"zscore": [{"metric": "*"}'},
     "KUBIOT_INGEST_ANOMALY_RULES: invalid anomaly rules"),
])
def test_invalid_configuration_is_refused_clearly(change: dict[str, str | None],
                                                  complaint: str) -> None:
    env = {k: v for k, v in {**OPERATOR_ENV, **change}.items() if v is not None}
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    assert complaint in str(caught.value)


def test_the_command_exits_2_on_invalid_configuration(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for key in OPERATOR_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("KUBIOT_INGEST_TENANT", "acme")
    monkeypatch.setenv("KUBIOT_INGEST_BATCH_SIZE", "-1")
    assert ingest_main.main() == 2
    err = capsys.readouterr().err
    assert "KUBIOT_INGEST_DATABASE_DSN" in err
    assert "KUBIOT_INGEST_BATCH_SIZE" in err


def test_the_process_collects_garbage_less_often_and_never_its_start_up_objects() -> None:
    import gc

    from kubiot_ingest.main import GC_THRESHOLDS, tune_garbage_collection

    before = gc.get_threshold()
    try:
        tune_garbage_collection()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_anomaly_rules_are_read_from_their_json_and_count_only_when_active(
        monkeypatch: pytest.MonkeyPatch) -> None:
    rules = '{"zscore": [{"metric": "*", "threshold": 6}], "reportSeconds": 30}'
    settings = load_settings({**OPERATOR_ENV, "KUBIOT_INGEST_ANOMALY_RULES": rules})
    assert settings.active_anomaly_rules is not None
    assert settings.active_anomaly_rules.zscore[0].threshold == 6
    off = load_settings({**OPERATOR_ENV, "KUBIOT_INGEST_ANOMALY_RULES":
                         '{"enabled": false, "zscore": [{"metric": "*"}]}'})
    assert off.anomaly_rules is not None and off.active_anomaly_rules is None
    assert load_settings(OPERATOR_ENV).active_anomaly_rules is None
    # From the process environment too, as the Deployment sets it.
    for key, value in OPERATOR_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KUBIOT_INGEST_ANOMALY_RULES", rules)
    assert load_settings().active_anomaly_rules == settings.active_anomaly_rules
