"""The operator settings pick the broker backend."""

from __future__ import annotations

from pydantic import SecretStr

from kubiot_operator.brokers import (
    BrokerBackend,
    EmqxBackend,
    MosquittoDynsecBackend,
    backend_from_settings,
)
from kubiot_operator.settings import BrokerKind, OperatorSettings


def test_mosquitto_is_the_default() -> None:
    backend = backend_from_settings(OperatorSettings(broker_admin_password=SecretStr("pw")))
    assert isinstance(backend, MosquittoDynsecBackend)
    assert isinstance(backend, BrokerBackend)


def test_emqx_when_asked() -> None:
    settings = OperatorSettings(broker=BrokerKind.EMQX, emqx_api_url="http://emqx:18083",
                                emqx_api_key="kubiot", emqx_api_secret=SecretStr("s"))
    backend = backend_from_settings(settings)
    assert isinstance(backend, EmqxBackend)
    assert isinstance(backend, BrokerBackend)
