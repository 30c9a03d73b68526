"""A device's credential bundle (the data of its `<device>-device-credentials` Secret)."""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kubiot_contract.topics import IdentityKind, parse_username


class BundleIncomplete(ValueError):
    """The bundle lacks something a device needs to connect."""


@dataclass(frozen=True)
class DeviceCredentials:
    """What a flashed device knows: who it is, where the broker is, whom to trust."""

    tenant: str
    name: str
    username: str
    topic_root: str
    broker_host: str
    broker_port: int
    certificate_pem: bytes
    key_pem: bytes
    broker_ca_pem: bytes
    firmware_key_pem: bytes
    password: str | None = None

    @classmethod
    def from_secret_data(cls, data: Mapping[str, bytes],
                         kind: IdentityKind = IdentityKind.DEVICE) -> DeviceCredentials:
        """Read the Secret's decoded data; raise BundleIncomplete naming what is missing.

        Gateways get the same bundle (`kind=IdentityKind.GATEWAY`).
        """
        required = ("username", "topic-root", "broker-host", "broker-port", "tls.crt", "tls.key",
                    "firmware-signing.pub")
        missing = [key for key in required if not data.get(key)]
        if missing:
            raise BundleIncomplete(f"the credential bundle lacks {', '.join(missing)}")
        username = data["username"].decode()
        identity = parse_username(username)
        if identity.kind is not kind:
            raise BundleIncomplete(f"{username} is not a {kind.value} identity")
        # A broker with a publicly trusted certificate needs no broker-ca.crt; the tenant CA
        # (ca.crt) is the fallback some single-CA setups use for both.
        broker_ca = data.get("broker-ca.crt") or data.get("ca.crt") or b""
        password = data.get("password")
        return cls(tenant=identity.tenant, name=identity.name, username=username,
                   topic_root=data["topic-root"].decode().rstrip("/"),
                   broker_host=data["broker-host"].decode(),
                   broker_port=int(data["broker-port"].decode()),
                   certificate_pem=data["tls.crt"], key_pem=data["tls.key"],
                   broker_ca_pem=broker_ca, firmware_key_pem=data["firmware-signing.pub"],
                   password=password.decode() if password else None)

    def tls_context(self, *, check_hostname: bool = True) -> ssl.SSLContext:
        """Mutual TLS: present the device certificate, trust only the broker's CA."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if self.broker_ca_pem:
            context.load_verify_locations(cadata=self.broker_ca_pem.decode())
        context.check_hostname = check_hostname
        # ssl loads a certificate chain only from files; they live just long enough to load.
        with tempfile.TemporaryDirectory(prefix="kubiot-device-") as folder:
            cert, key = Path(folder, "tls.crt"), Path(folder, "tls.key")
            cert.write_bytes(self.certificate_pem)
            key.touch(mode=0o600)
            key.write_bytes(self.key_pem)
            context.load_cert_chain(os.fspath(cert), os.fspath(key))
        return context
