"""Where a simulated device gets firmware images: file:// and http(s):// URLs, or synthetic
images derived from the URL, so tests need no server yet a wrong hash is still caught."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

import aiohttp

MAX_IMAGE_BYTES = 64 * 1024 * 1024  # a simulated device has little flash


class ArtifactUnavailable(Exception):
    """The image could not be fetched."""


class ArtifactSource(Protocol):
    async def fetch(self, url: str) -> bytes: ...


class UrlArtifacts:
    """Reads file:// paths and downloads http(s):// URLs."""

    def __init__(self, timeout_seconds: float = 30.0) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)

    async def fetch(self, url: str) -> bytes:
        parsed = urlparse(url)
        if parsed.scheme == "file":
            try:
                return await asyncio.to_thread(Path(unquote(parsed.path)).read_bytes)
            except OSError as exc:
                raise ArtifactUnavailable(f"{url}: {exc}") from exc
        if parsed.scheme not in ("http", "https"):
            raise ArtifactUnavailable(f"{url}: unsupported scheme {parsed.scheme!r}")
        try:
            async with aiohttp.ClientSession(timeout=self._timeout) as session, \
                    session.get(url) as response:
                if response.status != 200:
                    raise ArtifactUnavailable(f"{url}: HTTP {response.status}")
                image = await response.content.read(MAX_IMAGE_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ArtifactUnavailable(f"{url}: {exc}") from exc
        if len(image) > MAX_IMAGE_BYTES:
            raise ArtifactUnavailable(f"{url}: larger than {MAX_IMAGE_BYTES} bytes")
        return image


def synthetic_image(url: str, size: int = 4096) -> bytes:
    """Deterministic bytes standing for the image at `url` (SHA-256 in counter mode)."""
    blocks = bytearray()
    counter = 0
    while len(blocks) < size:
        blocks += hashlib.sha256(f"{counter}:{url}".encode()).digest()
        counter += 1
    return bytes(blocks[:size])


class SyntheticArtifacts:
    """Serves `synthetic_image(url, size)` for every URL: a release made with its hash installs,
    one with another hash is refused, as with a real download."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size

    async def fetch(self, url: str) -> bytes:
        return synthetic_image(url, self.size)
