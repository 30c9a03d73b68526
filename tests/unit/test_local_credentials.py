"""Credential bundles as files: written whole, read whole, never half of one version."""

from __future__ import annotations

import base64
import os
import stat
import threading
from pathlib import Path
from typing import Any

from kubiot_operator.local.credentials import DATA_LINK, export_bundle, read_bundle


def secret(version: str, *, password: bool = True) -> dict[str, Any]:
    data = {"tls.crt": f"cert {version}", "tls.key": f"key {version}", "ca.crt": f"ca {version}",
            "firmware-signing.pub": f"signing {version}", "username": f"acme.dev-{version}",
            "topic-root": "acme/devices/dev", "broker-host": "broker", "broker-port": "8883"}
    if password:
        data["password"] = f"password {version}"
    return {"data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


def versions(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("..version-"))


def test_a_bundle_reads_back_as_the_secret_data_it_was_written_from(tmp_path: Path) -> None:
    folder = export_bundle(secret("1"), tmp_path / "acme" / "dev")
    data = read_bundle(folder)
    assert data["tls.key"] == b"key 1" and data["password"] == b"password 1"
    assert data["username"] == b"acme.dev-1" and data["broker-port"] == b"8883"
    # Each file is where a firmware engineer looks for it, private, behind the current version.
    assert (folder / "tls.key").read_bytes() == b"key 1"
    assert os.readlink(folder / "tls.key") == f"{DATA_LINK}/tls.key"
    assert stat.S_IMODE(os.stat(folder / "tls.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert "KUBIOT_USERNAME=acme.dev-1" in (folder / "connection.env").read_text()


def test_an_unchanged_secret_writes_nothing_and_a_changed_one_replaces_the_version(
        tmp_path: Path) -> None:
    folder = export_bundle(secret("1"), tmp_path)
    first = versions(folder)
    export_bundle(secret("1"), folder)
    assert versions(folder) == first and len(first) == 1
    export_bundle(secret("2", password=False), folder)
    assert len(versions(folder)) == 1 and versions(folder) != first  # the old one is removed
    assert read_bundle(folder)["tls.crt"] == b"cert 2"
    assert "password" not in read_bundle(folder) and not os.path.lexists(folder / "password")


def test_a_folder_of_plain_files_is_read_and_then_replaced_by_a_version(tmp_path: Path) -> None:
    (tmp_path / "tls.crt").write_bytes(b"old cert")
    (tmp_path / "connection.env").write_text("KUBIOT_USERNAME=acme.old\n")
    assert read_bundle(tmp_path) == {"tls.crt": b"old cert", "username": b"acme.old"}
    export_bundle(secret("1"), tmp_path)
    assert read_bundle(tmp_path)["username"] == b"acme.dev-1"
    assert (tmp_path / "tls.crt").is_symlink()


def test_a_reader_racing_the_writer_sees_nothing_or_one_whole_version(tmp_path: Path) -> None:
    """What a device or a test sees while the stack exports and rotates its bundle."""
    folder = tmp_path / "dev"
    done = threading.Event()
    seen: list[dict[str, bytes]] = []

    def reader() -> None:
        while not done.is_set():
            if (folder / "tls.key").exists():
                seen.append(read_bundle(folder))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for round_ in range(300):
            export_bundle(secret(str(round_ % 2)), folder)
    finally:
        done.set()
        thread.join()
    assert seen, "the reader never saw the bundle"
    for data in seen:
        version = data["tls.crt"].removeprefix(b"cert ")
        assert data == {k: base64.b64decode(v) for k, v in secret(version.decode())["data"].items()}
    assert len(versions(folder)) == 1
