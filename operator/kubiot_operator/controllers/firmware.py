"""The FirmwareRelease controller: signed jobs to the devices of each wave, status from reports.

The rollout decisions (waves, outcomes, abort) are made by `reconcile.rollout.plan_rollout`; this
module gathers what it needs (the selected devices, what they report, the other releases), signs
and publishes the jobs it asks for, and turns the plan into the release's status.

Jobs are per device: the signed manifest names the device and the tenant, so a job cannot be
replayed to another device. A job is published (retained) once per device and release; the
Device's `status.firmware.target`/`release` record that it was sent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from kubiot_contract.topics import device_root, ota_job_topic
from kubiot_operator.kube.client import DEVICES, FIRMWARERELEASES, NotFound
from kubiot_operator.models import DEVICE, FIRMWARE_RELEASE
from kubiot_operator.models.firmware import (
    FirmwareReleaseSpec,
    GateName,
    GateState,
    ReleasePhase,
    RolloutCounts,
)
from kubiot_operator.reconcile.conditions import ConditionUpdate, set_conditions
from kubiot_operator.reconcile.release import (
    RECHECK_SECONDS,
    DeviceView,
    ReleaseView,
    counts_wire,
    gate_verdict,
    gate_wire,
    manifest_digest,
    may_send,
    previous_release,
    release_manifest,
    retry_after,
    rollout_state,
    signed_job,
    superseding_release,
    wire_time,
)
from kubiot_operator.reconcile.rollout import (
    HEALTH_GATE_FAILED,
    DeviceOutcome,
    RolloutPlan,
    RolloutState,
    plan_rollout,
)

from .objects import (
    checked_status,
    conditions_wire,
    current_conditions,
    generation,
    parse_spec,
    tenant_of_namespace,
    validation_message,
)
from .platform import Outcome, Platform

TENANT_RETRY_SECONDS = 10.0
PROGRESSING = "Progressing"
ROLLED_BACK = "RolledBack"
HEALTH_GATE = "HealthGate"
COUNT_STATES = ("pending", "downloading", "installing", "succeeded", "failed", "timed_out",
                "rolled_back")


# --- the controller --------------------------------------------------------------------------


@dataclass
class _Release:
    """One reconcile's facts about the release being reconciled."""

    name: str
    namespace: str
    tenant: str
    view: ReleaseView
    manifest: dict[str, Any]
    status: dict[str, Any]


def rollout_due(body: Mapping[str, Any]) -> bool:
    """Whether the release has work a periodic recheck can advance: a rollout not yet
    finished, aborted or superseded (a paused one still follows the wave under way)."""
    phase = (body.get("status") or {}).get("phase")
    return phase not in (ReleasePhase.SUCCEEDED.value, ReleasePhase.ABORTED.value,
                         ReleasePhase.SUPERSEDED.value)


async def reconcile_release(platform: Platform, body: dict[str, Any]) -> Outcome:
    """Advance the rollout one step and return the release's status."""
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    # The change handler and the periodic recheck may run at once. One at a time, each from
    # the status the previous one wrote (written here too, before the lock is released), so a
    # wave start or an abort is announced and counted once.
    async with platform.lock(f"FirmwareRelease/{namespace}/{name}"):
        latest = await platform.objects.get(FIRMWARERELEASES, name, namespace)
        outcome = await _reconcile(platform, latest if latest is not None else body)
        with contextlib.suppress(NotFound):  # deleted meanwhile: nothing to record
            await platform.objects.patch(
                FIRMWARERELEASES, name,
                {"status": checked_status(FIRMWARE_RELEASE, outcome.status)},
                namespace, subresource="status")
        return outcome


async def _reconcile(platform: Platform, body: dict[str, Any]) -> Outcome:
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    previous_status: dict[str, Any] = dict(body.get("status") or {})
    conditions = current_conditions(body)
    now = platform.clock()
    outcome = Outcome(status={"observedGeneration": generation(body)})

    def finish(phase: ReleasePhase, updates: list[ConditionUpdate]) -> Outcome:
        merged = set_conditions(conditions, updates, now, generation(body))
        outcome.status.update(phase=phase.value, conditions=conditions_wire(merged))
        return outcome

    try:
        spec = parse_spec(FirmwareReleaseSpec, body)
    except ValidationError as exc:
        message = validation_message(exc)
        outcome.warning("InvalidSpec", message)
        return finish(ReleasePhase.PENDING, [ConditionUpdate("Ready", False, "InvalidSpec",
                                                             message)])
    found = await tenant_of_namespace(platform.objects, namespace)
    if found is None:
        outcome.retry_after, outcome.retry_reason = TENANT_RETRY_SECONDS, "TenantNotFound"
        return finish(ReleasePhase.PENDING, [ConditionUpdate(
            "Ready", False, "TenantNotFound", f"namespace {namespace} belongs to no Tenant (yet)")])
    tenant = found[0]
    manifest = release_manifest(spec, tenant, name)
    digest = manifest_digest(manifest)
    view = ReleaseView(name, meta.get("creationTimestamp") or "", spec,
                       previous_status.get("phase"))
    release = _Release(name, namespace, tenant, view, manifest, previous_status)

    devices = await _devices(platform, namespace)
    targeted = [d for d in devices if d.selected_by(spec.selector)]
    others = await _other_releases(platform, namespace, name)
    state = before = rollout_state(previous_status, digest)
    superseded_by = previous_status.get("supersededBy") if state.phase is \
        ReleasePhase.SUPERSEDED else None
    if state.phase not in (ReleasePhase.SUCCEEDED, ReleasePhase.ABORTED,
                           ReleasePhase.SUPERSEDED):
        superseded_by = superseding_release(view, others, devices)
        if superseded_by is not None:
            state = replace(state, phase=ReleasePhase.SUPERSEDED)

    gated = spec.strategy.health_gate is not None
    plan = plan_rollout(spec, str(meta.get("uid") or name),
                        [d.as_rollout_input(platform.health.get(tenant, d.name) if gated else None)
                         for d in targeted], state, now,
                        health_observed_since=platform.health.observed_since)
    key = await platform.authority.signing_key(tenant)
    by_name = {d.name: d for d in targeted}
    ages = {o.name: o.age_key for o in others}
    for device in plan.send_job:
        if may_send(by_name[device], view, ages, plan.phase):
            await _send(platform, release, key, manifest, by_name[device])
    handed_back, stranded = await _roll_back(platform, release, key, plan, others, by_name)

    counts = _counts(plan, state, previous_status, handed_back)
    _record_metrics(platform, tenant, name, counts)
    _announce(outcome, plan, before, previous_status, platform, tenant, name)
    outcome.status.update(
        targeted=len(targeted), currentWave=plan.current_wave, wavesTotal=plan.waves_total,
        counts=counts_wire(counts), progress=plan.progress, manifestSha256=digest,
        waveStartTimes=[wire_time(t) for t in plan.wave_starts],
        waveCompletedAt=wire_time(plan.wave_completed_at) if plan.wave_completed_at else None,
        supersededBy=superseded_by, healthGate=_gate_status(plan, before, previous_status))
    retry = retry_after(plan, spec, now)
    if plan.phase is ReleasePhase.ABORTED and state.phase is not ReleasePhase.ABORTED:
        retry = RECHECK_SECONDS  # the devices still working when it aborted are rolled back next
    if retry is not None:
        outcome.retry_after, outcome.retry_reason = retry, plan.reason or plan.phase.value
        outcome.planned = True
    return finish(plan.phase, _conditions(plan, handed_back, stranded))


async def delete_release(platform: Platform, body: dict[str, Any]) -> Outcome:
    """Withdraw the job from devices that have not installed it; forget the release's metrics."""
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    outcome = Outcome(status={})
    found = await tenant_of_namespace(platform.objects, namespace)
    if found is not None:
        tenant = found[0]
        for state in COUNT_STATES:
            with contextlib.suppress(KeyError):  # never reported
                platform.metrics.rollout_devices.remove(tenant, name, state)
        with contextlib.suppress(KeyError):
            platform.metrics.rollouts_aborted.remove(tenant, name)
        for gate in GateName:
            with contextlib.suppress(KeyError):
                platform.metrics.rollout_gate_failures.remove(tenant, name, gate.value)
        for device in await _devices(platform, namespace):
            target = device.firmware.get("target")
            if device.firmware.get("release") != name or device.current == target:
                continue
            await platform.messenger.publish(ota_job_topic(device_root(tenant, device.name)), b"",
                                             retain=True)
            await _patch_firmware(platform, namespace, device.name,
                                  {"target": None, "release": None})
    return outcome


async def _devices(platform: Platform, namespace: str) -> list[DeviceView]:
    return [DeviceView(d.name, dict(d.labels), d.model, dict(d.firmware))
            for d in platform.fleet.devices(namespace)]


async def _other_releases(platform: Platform, namespace: str, name: str) -> list[ReleaseView]:
    views = []
    for body in platform.fleet.releases(namespace):
        meta = body["metadata"]
        if meta["name"] == name or meta.get("deletionTimestamp"):
            continue
        try:
            spec = parse_spec(FirmwareReleaseSpec, body)
        except ValidationError:
            continue  # it reports its own invalid spec
        views.append(ReleaseView(meta["name"], meta.get("creationTimestamp") or "", spec,
                                 (body.get("status") or {}).get("phase")))
    return views


async def _send(platform: Platform, release: _Release, key: Ed25519PrivateKey,
                manifest: Mapping[str, Any], device: DeviceView) -> bool:
    """Publish `manifest`'s job to the device unless it already has it; True when sent."""
    version, name = str(manifest["version"]), str(manifest["release"])
    if device.sent(name, version):
        return False
    topic = ota_job_topic(device_root(release.tenant, device.name))
    await platform.messenger.publish(topic, signed_job(key, manifest, device.name), retain=True)
    await _patch_firmware(platform, release.namespace, device.name,
                          {"target": version, "release": name})
    return True


async def _roll_back(platform: Platform, release: _Release, key: Ed25519PrivateKey,
                     plan: RolloutPlan, others: Sequence[ReleaseView],
                     by_name: Mapping[str, DeviceView]) -> tuple[int, int]:
    """Send each failed device still holding this release's job its previous release.

    Returns how many devices no longer hold this release's job, and how many have no previous
    release to go back to.
    """
    handed_back = stranded = 0
    for name in plan.roll_back:
        device = by_name[name]
        if device.firmware.get("release") != release.name:
            handed_back += 1  # already rolled back, or a newer release has taken it over
            continue
        previous = previous_release(release.view, others, device)
        if previous is None:
            stranded += 1
            continue
        manifest = release_manifest(previous.spec, release.tenant, previous.name)
        await _send(platform, release, key, manifest, device)
        handed_back += 1
    return handed_back, stranded


async def _patch_firmware(platform: Platform, namespace: str, device: str,
                          firmware: dict[str, Any]) -> None:
    with contextlib.suppress(NotFound):  # a device deleted meanwhile needs nothing
        await platform.objects.patch(
            DEVICES, device, {"status": checked_status(DEVICE, {"firmware": firmware})},
            namespace, subresource="status")


def _counts(plan: RolloutPlan, state: RolloutState, previous_status: Mapping[str, Any],
            handed_back: int) -> RolloutCounts:
    """The plan's tally; once aborted, the tally at the abort stays, plus who was rolled back.

    After a rollback a device reports on the previous release's job, so recomputing would blur
    why it was rolled back.
    """
    counts = plan.counts
    frozen = previous_status.get("counts")
    if plan.phase is ReleasePhase.ABORTED and state.phase is ReleasePhase.ABORTED and frozen:
        with contextlib.suppress(ValidationError):
            counts = RolloutCounts.model_validate(frozen)
    return counts.model_copy(update={"rolled_back": handed_back})


def _gate_status(plan: RolloutPlan, before: RolloutState, previous_status: Mapping[str, Any]
                 ) -> dict[str, Any] | None:
    """The gate's latest verdict; while a wave is under way, the previous wave's stays shown
    (unless the rollout started over)."""
    if plan.gate is not None:
        return gate_wire(plan.gate)
    previous = previous_status.get("healthGate")
    return dict(previous) if before.wave_starts and isinstance(previous, Mapping) else None


def _record_metrics(platform: Platform, tenant: str, release: str, counts: RolloutCounts) -> None:
    for state in COUNT_STATES:
        platform.metrics.rollout_devices.labels(tenant, release, state).set(
            getattr(counts, state))


def _announce(outcome: Outcome, plan: RolloutPlan, state: RolloutState,
              previous_status: Mapping[str, Any], platform: Platform, tenant: str,
              release: str) -> None:
    """Events (and the abort counter) for what changed in this reconcile."""
    phase, was = plan.phase, state.phase
    gate_before = gate_verdict(previous_status.get("healthGate"))
    if plan.gate is not None and plan.gate.state is GateState.PASSED and gate_before is not None \
            and gate_before.state is GateState.SOAKING:
        outcome.normal("HealthGatePassed", f"the {plan.gate.checked} devices updated so far "
                       f"stayed healthy through the soak of wave {plan.gate.wave}")
    started_before = len(state.wave_starts) if previous_status.get("phase") else 0
    if phase in (ReleasePhase.PROGRESSING, ReleasePhase.PAUSED) and \
            len(plan.wave_starts) > started_before:
        size = sum(1 for o in plan.outcomes.values() if o is not DeviceOutcome.WAITING)
        what = "canary" if plan.current_wave == 0 else f"wave {plan.current_wave}"
        outcome.normal("WaveStarted", f"{what} started: {size} devices have the job")
    if phase is was:
        return
    if phase is ReleasePhase.ABORTED:
        platform.metrics.rollouts_aborted.labels(tenant, release).inc()
        outcome.warning("RolloutAborted", plan.message)
        failed = plan.gate.failed_gate if plan.gate is not None else None
        if failed is not None:
            platform.metrics.rollout_gate_failures.labels(tenant, release, failed.value).inc()
            outcome.warning(HEALTH_GATE_FAILED, plan.message)
    elif phase is ReleasePhase.SUCCEEDED:
        outcome.normal("RolloutSucceeded", plan.message)
    elif phase is ReleasePhase.PAUSED:
        outcome.normal("RolloutPaused", plan.message)
    elif phase is ReleasePhase.SUPERSEDED:
        outcome.normal("Superseded", plan.message)
    elif phase is ReleasePhase.PROGRESSING and was is ReleasePhase.PAUSED:
        outcome.normal("RolloutResumed", plan.message)


def _conditions(plan: RolloutPlan, handed_back: int, stranded: int) -> list[ConditionUpdate]:
    updates = [
        ConditionUpdate("Ready", plan.phase is ReleasePhase.SUCCEEDED, plan.reason, plan.message),
        ConditionUpdate(PROGRESSING, plan.phase is ReleasePhase.PROGRESSING, plan.reason,
                        plan.message),
    ]
    if plan.gate is not None:
        passing = plan.gate.state is not GateState.FAILED
        updates.append(ConditionUpdate(
            HEALTH_GATE, passing, plan.gate.state.value if passing else HEALTH_GATE_FAILED,
            plan.gate.summary() if not passing else
            f"wave {plan.gate.wave}: {plan.gate.checked - plan.gate.unhealthy_count} of "
            f"{plan.gate.checked} updated devices healthy ({plan.gate.budget} unhealthy "
            "allowed)"))
    if plan.roll_back:
        updates.append(ConditionUpdate(
            ROLLED_BACK, stranded == 0, "NoPreviousRelease" if stranded else "PreviousReleaseSent",
            f"{handed_back} devices were sent their previous release"
            + (f"; {stranded} have no previous release to go back to" if stranded else "")))
    return updates
