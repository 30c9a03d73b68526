"""Device credential bundles as files: what a firmware engineer flashes, and what the
simulated devices of the local stack connect with."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kubiot_operator.kube.secrets import secret_data

BUNDLE_FILES = ("tls.crt", "tls.key", "ca.crt", "broker-ca.crt", "firmware-signing.pub",
                "password", "connection.env")


def export_bundle(secret: dict[str, Any], folder: Path) -> Path:
    """Write the Secret's files (private ones 0600) plus a connection.env; returns the folder."""
    files = secret_data(secret)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name in BUNDLE_FILES:
        if name in files:
            _write(folder / name, files[name])
    env = {
        "KUBIOT_USERNAME": files.get("username", b"").decode(),
        "KUBIOT_TOPIC_ROOT": files.get("topic-root", b"").decode(),
        "KUBIOT_BROKER_HOST": files.get("broker-host", b"").decode(),
        "KUBIOT_BROKER_PORT": files.get("broker-port", b"").decode(),
    }
    _write(folder / "connection.env", "".join(f"{k}={v}\n" for k, v in env.items()).encode())
    return folder


#: connection.env's variables, and the Secret keys they came from.
_CONNECTION_KEYS = {"KUBIOT_USERNAME": "username", "KUBIOT_TOPIC_ROOT": "topic-root",
                    "KUBIOT_BROKER_HOST": "broker-host", "KUBIOT_BROKER_PORT": "broker-port"}


def read_bundle(folder: Path) -> dict[str, bytes]:
    """A bundle `export_bundle` wrote, back as Secret data."""
    data = {name: (folder / name).read_bytes() for name in BUNDLE_FILES
            if name != "connection.env" and (folder / name).exists()}
    env = folder / "connection.env"
    if env.exists():
        for line in env.read_text().splitlines():
            variable, _, value = line.partition("=")
            if variable in _CONNECTION_KEYS and value:
                data[_CONNECTION_KEYS[variable]] = value.encode()
    return data


def _write(path: Path, data: bytes) -> None:
    if path.exists() and path.read_bytes() == data:
        return
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.chmod(temporary, 0o600)
    temporary.replace(path)
