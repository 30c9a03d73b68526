"""The local stack (`make dev`) run as a subprocess by end-to-end tests, and its processes."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from kubiot_operator.local.ports import free_port
from kubiot_operator.simulator import SIMULATE_ANNOTATION, synthetic_image

REPO = Path(__file__).resolve().parents[2]


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc."""
    found: set[int] = set()
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    frontier.append(child)
    return found


async def none_alive(pids: set[int]) -> bool:
    return not any(alive(pid) for pid in pids)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Stack:
    """`python -m kubiot_operator.local.stack` as a subprocess, on free ports, in `tmp`."""

    def __init__(self, tmp: Path, *extra_args: str) -> None:
        self.extra_args = extra_args
        self.manifests = tmp / "manifests"
        shutil.copytree(REPO / "manifests" / "examples", self.manifests)
        # The example release as it is, but with a second between waves instead of ten minutes.
        release = self.manifests / "firmware-release.yaml"
        document = yaml.safe_load(release.read_text())
        document["spec"]["strategy"]["pauseBetweenWavesSeconds"] = 1
        release.write_text(yaml.safe_dump(document, sort_keys=False))
        self.root = tmp / ".kubiot"
        self.postgres_port = free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.postgres_port}/kubiot"
        self.log = tmp / "stack.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kubiot_operator.local.stack", "--dir", str(self.root),
             "--manifests", str(self.manifests), "--postgres-port", str(self.postgres_port),
             "--telemetry-interval", "0.5", "--quiet", *self.extra_args],
            cwd=REPO, stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def set_suspended(self, device: str, suspended: bool) -> None:
        path = self.manifests / "devices.yaml"
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
        for document in documents:
            if document["metadata"]["name"] == device:
                document["spec"]["suspended"] = suspended
        path.write_text(yaml.safe_dump_all(documents, sort_keys=False))

    def simulate_faults(self, devices: tuple[str, ...], faults: str) -> None:
        """Annotate Devices' manifests with what their simulation does on which firmware
        (`kubiot.io/simulate`, see simulator/faults.py)."""
        path = self.manifests / "devices.yaml"
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
        for document in documents:
            if document["metadata"]["name"] in devices:
                document["metadata"].setdefault("annotations", {})[SIMULATE_ANNOTATION] = faults
        path.write_text(yaml.safe_dump_all(documents, sort_keys=False))

    def device_files(self, device: str) -> Path:
        return self.root / "devices" / "acme" / device


def pressure_sensor_release(version: str, namespace: str, strategy: Mapping[str, Any]
                            ) -> dict[str, Any]:
    """A FirmwareRelease of `version` for the example's pressure sensors (model ps-10), whose
    artifact is the synthetic image the simulated devices download for its URL."""
    url = f"https://firmware.acme.example/ps-10/{version}/ps-10-{version}.bin"
    image = synthetic_image(url)
    return {"apiVersion": "kubiot.io/v1alpha1", "kind": "FirmwareRelease",
            "metadata": {"name": f"ps-10-{version}", "namespace": namespace},
            "spec": {"version": version,
                     "artifact": {"url": url, "sha256": hashlib.sha256(image).hexdigest(),
                                  "size": len(image)},
                     "selector": {"model": "ps-10"},
                     "strategy": dict(strategy)}}


@contextmanager
def running_stack(*extra_args: str, prepare: Callable[[Stack], None] | None = None
                  ) -> Iterator[Stack]:
    """A started stack, killed with everything it started (and its files removed) at the end.

    `prepare` may change the copied manifests before the stack starts."""
    # Not pytest's tmp_path: PostgreSQL runs as an unprivileged user and must reach its folder.
    tmp = Path(tempfile.mkdtemp(prefix="kubiot-stack-"))
    tmp.chmod(0o755)
    stack = Stack(tmp, *extra_args)
    if prepare is not None:
        prepare(stack)
    stack.start()
    try:
        yield stack
    finally:
        if stack.process is not None and stack.process.poll() is None:
            stack.process.kill()
            stack.process.wait()
        subprocess.run(["pkill", "-f", str(tmp)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
