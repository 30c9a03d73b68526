"""Where PKI material lives: named bundles of files, shaped like Kubernetes Secrets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from kubiot_operator.pki.errors import PKIError

#: Bundle names are Secret names; keys are Secret data keys. Neither can escape a directory.
_BUNDLE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_KEY_NAME = re.compile(r"^[-._a-zA-Z0-9]+$")
_TEMP_PREFIX = ".kubiot-tmp-"
FILE_MODE = 0o600
DIR_MODE = 0o700


class MaterialStore(Protocol):
    """Named bundles of files; a bundle is written and read as a whole."""

    async def get(self, name: str) -> dict[str, bytes] | None: ...

    async def put(self, name: str, data: Mapping[str, bytes]) -> None: ...

    async def delete(self, name: str) -> None: ...


def check_bundle_name(name: str) -> str:
    if len(name) > 253 or not _BUNDLE_NAME.match(name):
        raise PKIError("InvalidBundleName", f"{name!r} is not a valid bundle (Secret) name")
    return name


def check_key_name(key: str) -> str:
    if len(key) > 253 or not _KEY_NAME.match(key) or key in (".", "..") \
            or key.startswith(_TEMP_PREFIX):
        raise PKIError("InvalidBundleKey", f"{key!r} is not a valid bundle (Secret) key")
    return key


class MemoryMaterialStore:
    """Bundles kept in memory: for tests and single-process use."""

    def __init__(self) -> None:
        self._bundles: dict[str, dict[str, bytes]] = {}

    async def get(self, name: str) -> dict[str, bytes] | None:
        bundle = self._bundles.get(check_bundle_name(name))
        return dict(bundle) if bundle is not None else None

    async def put(self, name: str, data: Mapping[str, bytes]) -> None:
        self._bundles[check_bundle_name(name)] = {
            check_key_name(key): bytes(value) for key, value in data.items()}

    async def delete(self, name: str) -> None:
        self._bundles.pop(check_bundle_name(name), None)

    def names(self) -> list[str]:
        return sorted(self._bundles)


class FileMaterialStore:
    """Bundles as directories under `root` (0700), one file per key (0600).

    Each file is replaced atomically (written aside, then renamed), so a reader such as the
    broker never sees a half-written certificate or CRL.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        """The directory of a bundle (the broker can be pointed at files inside it)."""
        return self.root / check_bundle_name(name)

    async def get(self, name: str) -> dict[str, bytes] | None:
        return await asyncio.to_thread(self._read, self.path(name))

    async def put(self, name: str, data: Mapping[str, bytes]) -> None:
        checked = {check_key_name(key): bytes(value) for key, value in data.items()}
        await asyncio.to_thread(self._write, self.path(name), checked)

    async def delete(self, name: str) -> None:
        await asyncio.to_thread(shutil.rmtree, self.path(name), True)

    @staticmethod
    def _read(directory: Path) -> dict[str, bytes] | None:
        try:
            entries = list(directory.iterdir())
        except FileNotFoundError:
            return None
        return {entry.name: entry.read_bytes() for entry in entries
                if entry.is_file() and not entry.name.startswith(_TEMP_PREFIX)}

    def _write(self, directory: Path, data: dict[str, bytes]) -> None:
        _make_private_dir(self.root)
        _make_private_dir(directory)
        staged: list[tuple[Path, Path]] = []
        try:
            for key, value in data.items():
                temp = directory / f"{_TEMP_PREFIX}{key}.{secrets.token_hex(4)}"
                _write_private_file(temp, value)
                staged.append((temp, directory / key))
            for temp, final in staged:
                os.replace(temp, final)
        finally:
            for temp, _ in staged:
                with contextlib.suppress(FileNotFoundError):
                    temp.unlink()
        for entry in directory.iterdir():
            if entry.is_file() and entry.name not in data \
                    and not entry.name.startswith(_TEMP_PREFIX):
                entry.unlink()
        _fsync_dir(directory)


def _make_private_dir(directory: Path) -> None:
    directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(directory, DIR_MODE)


def _write_private_file(path: Path, value: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(value)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
