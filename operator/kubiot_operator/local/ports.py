"""Loopback ports for servers started on this machine."""

from __future__ import annotations

import socket
import time
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until something accepts TCP connections on host:port, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nothing listens on {host}:{port} after {timeout:.0f}s") from None
            time.sleep(0.05)


def saved_ports(root: Path) -> dict[str, int]:
    """Ports of an earlier run, so a restarted stack keeps its addresses."""
    path = root / "ports.env"
    if not path.exists():
        return {}
    values = dict(line.split("=", 1) for line in path.read_text().split() if "=" in line)
    return {key: int(value) for key, value in values.items()}
