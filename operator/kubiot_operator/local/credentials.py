"""Device credential bundles as files: what a firmware engineer flashes, and what the
simulated devices of the local stack connect with.

A bundle folder is laid out the way the kubelet lays out a mounted Secret, so that no reader
ever sees half of one: every version is written whole into its own hidden directory, the
`..data` link is switched to it in one rename, and each file's name is a link through `..data`.
A reader that opens `tls.crt` and then `tls.key` of a bundle being replaced may still get two
versions; `read_bundle` resolves `..data` once and reads one version.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kubiot_operator.kube.secrets import secret_data

BUNDLE_FILES = ("tls.crt", "tls.key", "ca.crt", "broker-ca.crt", "firmware-signing.pub",
                "password", "connection.env")

#: The link to the bundle's current version, as in a kubelet Secret volume.
DATA_LINK = "..data"

#: connection.env's variables, and the Secret keys they came from.
_CONNECTION_KEYS = {"KUBIOT_USERNAME": "username", "KUBIOT_TOPIC_ROOT": "topic-root",
                    "KUBIOT_BROKER_HOST": "broker-host", "KUBIOT_BROKER_PORT": "broker-port"}


def bundle_files(secret: dict[str, Any]) -> dict[str, bytes]:
    """The files of a credential Secret's bundle, by name (connection.env included)."""
    data = secret_data(secret)
    files = {name: data[name] for name in BUNDLE_FILES if name in data}
    files["connection.env"] = "".join(
        f"{variable}={data.get(key, b'').decode()}\n"
        for variable, key in _CONNECTION_KEYS.items()).encode()
    return files


def export_bundle(secret: dict[str, Any], folder: Path) -> Path:
    """Write the Secret's bundle into `folder` as one new version (files 0600, folders 0700),
    unless the folder already holds exactly these files; returns the folder."""
    files = bundle_files(secret)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if _current_files(folder) == files:
        return folder
    version = Path(tempfile.mkdtemp(prefix="..version-", dir=folder))
    for name, content in files.items():
        descriptor = os.open(version / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(content)
    previous = _version_of(folder)
    _link(folder / DATA_LINK, version.name)
    for name in BUNDLE_FILES:
        if name in files:
            _link(folder / name, f"{DATA_LINK}/{name}")
        elif os.path.lexists(folder / name):
            (folder / name).unlink()
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return folder


def read_bundle(folder: Path) -> dict[str, bytes]:
    """A bundle `export_bundle` wrote, back as Secret data, all of one version."""
    files = _current_files(folder)
    data = {name: content for name, content in files.items() if name != "connection.env"}
    for line in files.get("connection.env", b"").decode().splitlines():
        variable, _, value = line.partition("=")
        if variable in _CONNECTION_KEYS and value:
            data[_CONNECTION_KEYS[variable]] = value.encode()
    return data


def _current_files(folder: Path, attempts: int = 5) -> dict[str, bytes]:
    """The files of the folder's current version ({} when it has none yet)."""
    for _ in range(attempts):
        version = _version_of(folder)
        if version is None:
            # A folder written before bundles had versions: its files are plain files.
            return _files_in(folder)
        try:
            files = _files_in(version)
        except FileNotFoundError:
            continue
        # A version is removed only once `..data` points past it: if the link has not moved,
        # nothing was removed while it was read.
        if _version_of(folder) == version:
            return files
    raise FileNotFoundError(f"the bundle in {folder} kept changing while it was read")


def _version_of(folder: Path) -> Path | None:
    try:
        return folder / os.readlink(folder / DATA_LINK)
    except FileNotFoundError:
        return None


def _files_in(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in BUNDLE_FILES
            if (folder / name).is_file()}


def _link(path: Path, target: str) -> None:
    """Point `path` at `target` in one rename (a reader sees the old link or the new one)."""
    if path.is_symlink() and os.readlink(path) == target:
        return
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(target)
    temporary.replace(path)
