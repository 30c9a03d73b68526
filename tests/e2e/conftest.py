"""Fixtures for running the operator end to end against the in-process Kubernetes emulator."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.kube_emulator import KubeEmulator


@pytest.fixture
async def kube() -> AsyncIterator[KubeEmulator]:
    """An empty emulated cluster serving kubiot's CRDs and the built-in kinds the operator uses."""
    async with KubeEmulator() as emulator:
        yield emulator
