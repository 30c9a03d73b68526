"""Provisioning by claim through the operator as a cluster runs it: kopf on the Kubernetes
emulator and a real Mosquitto. A person approves with a label, as with `kubectl label`."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from kubiot_operator.simulator.factory import (
    FactoryDevice,
    FactoryState,
    claim_credentials,
    ignore_lost_claim_sessions,
)
from tests.support.operator_env import (
    OperatorEnv,
    condition,
    example_documents,
    is_ready,
    operator_env,
)
from tests.support.waiting import async_wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[OperatorEnv]:
    async with operator_env(tmp_path) as environment:
        yield environment


async def test_a_manually_approved_device_provisions_itself_through_the_operator(
        env: OperatorEnv) -> None:
    (tenant,) = example_documents("tenant.yaml")
    tenant = copy.deepcopy(tenant)
    tenant["spec"]["provisioning"]["approval"] = "Manual"
    async with env.running():
        await env.apply(tenant)
        ready = await env.wait("Tenant", "acme", is_ready, timeout=60)
        claims = (ready or {})["status"]["claims"]
        assert [c["name"] for c in claims] == ["factory-line-1"]
        assert claims[0]["certificate"]["secretName"] == "factory-line-1-claim-credentials"
        claim = claim_credentials(await env.device_credentials("factory-line-1", kind="claim"))
        assert claim.username == "acme.claim.factory-line-1"

        ignore_lost_claim_sessions(asyncio.get_running_loop())
        device = FactoryDevice(claim, "sn-000042", check_hostname=False, telemetry_seconds=0.5)
        task = asyncio.create_task(device.run())
        try:
            pending = await env.wait("Device", "sn-000042", lambda d: (condition(
                d, "IdentityReady") or {}).get("reason") == "AwaitingApproval",
                namespace="acme", timeout=60)
            assert (pending or {})["status"]["phase"] == "Pending"

            async def told_to_wait() -> bool:
                return (device.last_answer is not None
                        and device.last_answer.reason == "AwaitingApproval")

            await async_wait_until(told_to_wait, timeout=30, interval=0.2,
                                   message="the device told to wait for approval")
            assert device.state is FactoryState.PENDING

            approved = await asyncio.to_thread(approve, env, "acme/sn-000042", "acme/nobody")
            assert approved.stdout == "Device acme/sn-000042 approved\n"
            assert approved.stderr == "no Device acme/nobody\n" and approved.returncode == 1
            await env.wait("Device", "sn-000042", is_ready, namespace="acme", timeout=60)
            await asyncio.wait_for(device.provisioned.wait(), 60)

            async def connected() -> bool:
                return device.device is not None and device.device.connected.is_set()

            await async_wait_until(connected, timeout=30, interval=0.2,
                                   message="the provisioned device connected")
            await env.wait("Device", "sn-000042", lambda d: bool(
                (d or {}).get("status", {}).get("online")), namespace="acme", timeout=30)
            again = await asyncio.to_thread(approve, env, "acme/sn-000042")
            assert again.stdout == "Device acme/sn-000042 was already approved\n"
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def approve(env: OperatorEnv, *devices: str) -> subprocess.CompletedProcess[str]:
    """`kubiot approve`, run as a person would, with a kubeconfig for the emulated cluster."""
    kubeconfig = env.root / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": env.kube.url,
                                                      "insecure-skip-tls-verify": True}}],
        "users": [{"name": "admin", "user": {"token": "admin"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "admin"}}],
    }))
    return subprocess.run(
        [sys.executable, "-c", "from kubiot_operator.cli import main; main()", "approve",
         *devices], env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        capture_output=True, text=True, timeout=60, check=False)
