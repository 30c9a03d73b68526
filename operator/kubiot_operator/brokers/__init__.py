"""Broker access control: one interface, Mosquitto 2 and EMQX 5 backends."""

from .base import (
    BrokerBackend,
    BrokerHealth,
    BrokerIdentity,
    CertificateCredential,
    Credential,
    PasswordCredential,
    SyncResult,
    password_fingerprint,
)
from .emqx import EmqxBackend
from .errors import BrokerAuthError, BrokerError, BrokerRejected, BrokerUnavailable, CircuitOpen
from .factory import backend_from_settings
from .mosquitto import MosquittoDynsecBackend
from .retry import Backoff, CircuitBreaker

__all__ = [
    "Backoff",
    "BrokerAuthError",
    "BrokerBackend",
    "BrokerError",
    "BrokerHealth",
    "BrokerIdentity",
    "BrokerRejected",
    "BrokerUnavailable",
    "CertificateCredential",
    "CircuitBreaker",
    "CircuitOpen",
    "Credential",
    "EmqxBackend",
    "MosquittoDynsecBackend",
    "PasswordCredential",
    "SyncResult",
    "backend_from_settings",
    "password_fingerprint",
]
