"""Prometheus metrics of the operator. Names are a contract with the alerts and dashboards."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kubiot_operator.models.device import DevicePhase

DEVICE_PHASES = tuple(phase.value for phase in DevicePhase)


class OperatorMetrics:
    """One registry per operator instance, so tests and embedded runs never share counters."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.reconciles = Counter(
            "kubiot_operator_reconcile_total", "Reconciles by kind and result.",
            ["kind", "result"], registry=r)
        self.reconcile_errors = Counter(
            "kubiot_operator_reconcile_errors_total", "Failed reconciles by kind and reason.",
            ["kind", "reason"], registry=r)
        self.reconcile_seconds = Histogram(
            "kubiot_operator_reconcile_duration_seconds", "Time spent in one reconcile.",
            ["kind"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.broker_errors = Counter(
            "kubiot_operator_broker_errors_total", "Broker calls that failed, by error type.",
            ["backend", "error"], registry=r)
        self.drift_repairs = Counter(
            "kubiot_operator_drift_repairs_total",
            "Broker changes that restored access the resources had already been given: by the "
            "periodic resync (action=resync) or by a Device reconcile (action=reconcile).",
            ["tenant", "action"], registry=r)
        self.resync_passes = Counter(
            "kubiot_operator_resync_passes_total",
            "Drift repair passes completed (every tenant compared with the broker).",
            registry=r)
        self.certificates_issued = Counter(
            "kubiot_operator_certificates_issued_total", "Certificates issued, by reason.",
            ["tenant", "reason"], registry=r)
        self.certificates_revoked = Counter(
            "kubiot_operator_certificates_revoked_total", "Certificates revoked.",
            ["tenant"], registry=r)
        self.certificate_expiry = Gauge(
            "kubiot_certificate_expiry_timestamp_seconds",
            "When a device or gateway certificate expires (Unix time).",
            ["tenant", "kind", "name"], registry=r)
        self.devices = Gauge(
            "kubiot_devices", "Devices per tenant and phase.", ["tenant", "phase"], registry=r)
        self.devices_online = Gauge(
            "kubiot_devices_online", "Devices whose presence is online.", ["tenant"], registry=r)
        self.status_patches = Counter(
            "kubiot_operator_status_patches_total", "Status patches sent for device reports.",
            registry=r)
        self.report_fields_rejected = Counter(
            "kubiot_operator_report_fields_rejected_total",
            "Reported values left out of status because its schema refuses them.",
            ["kind", "field"], registry=r)
        self.rollout_devices = Gauge(
            "kubiot_rollout_devices", "Devices of a firmware release by state.",
            ["tenant", "release", "state"], registry=r)
        self.commands_sent = Counter(
            "kubiot_commands_sent_total", "Commands published to devices.", ["tenant"],
            registry=r)
        self.command_answers = Counter(
            "kubiot_command_answers_total", "Command answers received, by what became of them: "
            "recorded, refused (not in the contract), unmatched (no such run or token), late "
            "(the target was not waiting for one).", ["outcome"], registry=r)
        self.command_runs = Counter(
            "kubiot_command_runs_total", "DeviceCommand runs finished, by phase.",
            ["tenant", "phase"], registry=r)
        self.devices_provisioned = Counter(
            "kubiot_devices_provisioned_total", "Devices created by provisioning by claim.",
            ["tenant", "claim"], registry=r)
        self.provisioning_answers = Counter(
            "kubiot_provisioning_answers_total",
            "Answers to provisioning requests: Accepted, a pending reason or a refusal reason.",
            ["outcome"], registry=r)
        self.rollouts_aborted = Counter(
            "kubiot_rollouts_aborted_total", "Firmware rollouts aborted by their failure budget.",
            ["tenant", "release"], registry=r)
        self.rollout_gate_failures = Counter(
            "kubiot_rollout_health_gate_failures_total",
            "Firmware rollouts aborted by their health gate, by the gate most unhealthy devices "
            "failed (Online, Telemetry, Anomalies, Metrics).",
            ["tenant", "release", "gate"], registry=r)
        # Device -> (tenant, phase), as its last reconcile concluded: kubiot_devices is counted
        # from it, one device at a time, never by listing the fleet.
        self._device_phases: dict[tuple[str, str], tuple[str, str]] = {}

    def device_phase(self, namespace: str, name: str, tenant: str, phase: str) -> None:
        """Record the phase a Device's reconcile concluded, for `kubiot_devices`."""
        before = self._device_phases.get((namespace, name))
        self._device_phases[(namespace, name)] = (tenant, phase)
        # A tenant's online gauge exists from its first device, so its offline share is defined
        # before any presence report arrives.
        self.devices_online.labels(tenant)
        self._count_devices(tenant)
        if before is not None and before[0] != tenant:
            self._count_devices(before[0])

    def device_gone(self, namespace: str, name: str) -> None:
        """Forget a deleted Device."""
        before = self._device_phases.pop((namespace, name), None)
        if before is not None:
            self._count_devices(before[0])

    def _count_devices(self, tenant: str) -> None:
        counts = device_counts(self._device_phases.values(), tenant)
        for phase, count in counts.items():
            self.devices.labels(tenant, phase).set(count)

    @contextmanager
    def reconciling(self, kind: str) -> Iterator[None]:
        """Count and time one reconcile; an exception counts as an error result."""
        started = time.perf_counter()
        try:
            yield
        except Exception:
            self.reconciles.labels(kind, "error").inc()
            raise
        else:
            self.reconciles.labels(kind, "success").inc()
        finally:
            self.reconcile_seconds.labels(kind).observe(time.perf_counter() - started)


def device_counts(phases: Iterable[tuple[str, str]], tenant: str) -> dict[str, int]:
    """Devices of a tenant per phase, with every known phase present (0 when none is in it) so
    that a phase emptied goes to 0 rather than keeping its last count."""
    counts = dict.fromkeys(DEVICE_PHASES, 0)
    for owner, phase in phases:
        if owner == tenant:
            counts[phase] = counts.get(phase, 0) + 1
    return counts
