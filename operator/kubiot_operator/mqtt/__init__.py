"""The operator's own MQTT connection: what it sends to devices and what it hears from them."""

from .connection import MessengerUnavailable, OperatorMqtt

__all__ = ["MessengerUnavailable", "OperatorMqtt"]
