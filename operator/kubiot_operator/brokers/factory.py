"""Pick and build the broker backend the operator settings name."""

from __future__ import annotations

from kubiot_operator.settings import BrokerKind, OperatorSettings

from .base import BrokerBackend
from .emqx import EmqxBackend
from .mosquitto import MosquittoDynsecBackend


def backend_from_settings(settings: OperatorSettings) -> BrokerBackend:
    """The configured backend, not yet connected (both connect on first use)."""
    if settings.broker is BrokerKind.EMQX:
        return EmqxBackend(settings.emqx_api_url, settings.emqx_api_key,
                           settings.emqx_api_secret.get_secret_value())
    return MosquittoDynsecBackend(
        settings.broker_admin_host, settings.broker_admin_port,
        settings.broker_admin_username, settings.broker_admin_password.get_secret_value(),
    )
