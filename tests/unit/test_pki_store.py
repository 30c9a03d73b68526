"""Material stores: bundles written whole, private on disk, read back as written."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest

from kubiot_operator.pki import FileMaterialStore, MaterialStore, MemoryMaterialStore, PKIError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=["memory", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> MaterialStore:
    if request.param == "memory":
        return MemoryMaterialStore()
    return FileMaterialStore(tmp_path / "pki")


async def test_bundles_round_trip_and_replace_whole(store: MaterialStore) -> None:
    assert await store.get("tenant-acme-ca") is None
    await store.put("tenant-acme-ca", {"tls.crt": b"cert", "tls.key": b"key"})
    assert await store.get("tenant-acme-ca") == {"tls.crt": b"cert", "tls.key": b"key"}
    await store.put("tenant-acme-ca", {"tls.crt": b"cert-2"})
    assert await store.get("tenant-acme-ca") == {"tls.crt": b"cert-2"}
    await store.delete("tenant-acme-ca")
    assert await store.get("tenant-acme-ca") is None
    await store.delete("tenant-acme-ca")  # deleting what is gone is fine


async def test_names_that_could_escape_are_refused(store: MaterialStore) -> None:
    for name in ("../etc", "a/b", "", "UPPER", ".hidden"):
        with pytest.raises(PKIError):
            await store.put(name, {"k": b"v"})
    for key in ("../x", "a/b", "", ".."):
        with pytest.raises(PKIError):
            await store.put("bundle", {key: b"v"})


async def test_files_are_private(tmp_path: Path) -> None:
    root = tmp_path / "pki"
    store = FileMaterialStore(root)
    await store.put("tenant-acme-ca", {"tls.crt": b"cert", "tls.key": b"secret"})
    assert _mode(root) == 0o700
    assert _mode(root / "tenant-acme-ca") == 0o700
    assert _mode(root / "tenant-acme-ca" / "tls.key") == 0o600
    assert _mode(root / "tenant-acme-ca" / "tls.crt") == 0o600
    assert store.path("tenant-acme-ca") == root / "tenant-acme-ca"
    # Nothing of the staging is left behind.
    assert sorted(p.name for p in (root / "tenant-acme-ca").iterdir()) == ["tls.crt", "tls.key"]


async def test_a_rewrite_replaces_files_instead_of_editing_them(tmp_path: Path) -> None:
    store = FileMaterialStore(tmp_path)
    await store.put("b", {"crl.pem": b"one"})
    path = tmp_path / "b" / "crl.pem"
    inode = path.stat().st_ino
    with path.open("rb") as reader:  # a reader holding the old file still sees it whole
        await store.put("b", {"crl.pem": b"two"})
        assert reader.read() == b"one"
    assert path.read_bytes() == b"two"
    assert path.stat().st_ino != inode


async def test_concurrent_writers_of_different_bundles(tmp_path: Path) -> None:
    store = FileMaterialStore(tmp_path)
    await asyncio.gather(*(store.put(f"bundle-{i}", {"v": str(i).encode()}) for i in range(20)))
    for i in range(20):
        assert await store.get(f"bundle-{i}") == {"v": str(i).encode()}


async def test_memory_store_hands_out_copies() -> None:
    store = MemoryMaterialStore()
    await store.put("b", {"k": b"v"})
    bundle = await store.get("b")
    assert bundle is not None
    bundle["k"] = b"changed"
    assert await store.get("b") == {"k": b"v"}
    assert store.names() == ["b"]
