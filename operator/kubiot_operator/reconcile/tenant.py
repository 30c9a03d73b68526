"""What a Tenant needs in the cluster: its namespace and its ingest pipeline objects."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubiot_contract.topics import ingest_username
from kubiot_operator.models.tenant import TenantSpec

TENANT_LABEL = "kubiot.io/tenant"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY = {"app.kubernetes.io/managed-by": "kubiot-operator",
              "app.kubernetes.io/part-of": "kubiot"}
INGEST_METRICS_PORT = 9464


def tenant_namespace(name: str, spec: TenantSpec) -> str:
    """The namespace of a tenant's devices: `spec.namespace`, or the tenant's name."""
    return spec.namespace or name


def database_schema(name: str, spec: TenantSpec) -> str:
    """The database schema holding the tenant's telemetry."""
    return spec.ingest.database.schema_name or f"tenant_{name.replace('-', '_')}"


def ingest_name(tenant: str) -> str:
    return f"{tenant}-ingest"


def ingest_broker_secret_name(tenant: str) -> str:
    """The Secret with the ingest service's broker username and password."""
    return f"{tenant}-ingest-broker"


def namespace_refusal(tenant: str, tenant_uid: str, namespace: str,
                      existing: Mapping[str, Any] | None) -> str | None:
    """Why a Tenant may not use an existing namespace; None when it is absent or the Tenant's.

    A namespace is the Tenant's only if the Tenant created it (its ownerReference carries the
    Tenant's uid). Adopting any other would hand it to garbage collection, so deleting the
    Tenant would delete, say, `monitoring` or another Tenant's devices."""
    if existing is None:
        return None
    meta = existing.get("metadata") or {}
    if any(ref.get("uid") == tenant_uid for ref in meta.get("ownerReferences") or []):
        return None
    owner = (meta.get("labels") or {}).get(TENANT_LABEL)
    if meta.get("deletionTimestamp"):
        return f"namespace {namespace} is being deleted; it can be created again once it is gone"
    if owner and owner != tenant:
        return (f"namespace {namespace} belongs to Tenant {owner}; choose another "
                "spec.namespace")
    return (f"namespace {namespace} already exists and kubiot did not create it for this "
            "Tenant; kubiot never adopts a namespace (deleting the Tenant would delete it). "
            "Choose another spec.namespace, or delete the namespace")


def namespace_object(tenant: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": namespace, "labels": {TENANT_LABEL: tenant, **MANAGED_BY}},
    }


#: The Prometheus Operator's API: optional, a cluster without it (minikube) serves neither kind.
MONITORING_API = "monitoring.coreos.com/v1"
SERVICE_MONITOR = "ServiceMonitor"
POD_MONITOR = "PodMonitor"


@dataclass(frozen=True)
class IngestEnvironment:
    """Platform facts the ingest Deployment needs besides the tenant's spec."""

    image: str
    broker_host: str
    broker_port: int
    platform_database_secret: str
    platform_database_key: str
    #: Namespace of the Prometheus allowed through the ingest NetworkPolicy.
    monitoring_namespace: str = "monitoring"
    #: Labels the cluster's Prometheus selects monitors by (kube-prometheus-stack: `release`).
    monitor_labels: Mapping[str, str] = field(default_factory=dict)


def monitor_kind(served: Collection[str]) -> str | None:
    """Which Prometheus Operator object scrapes the ingest, of those the cluster serves.

    A ServiceMonitor fits the ingest Service; a cluster with only the PodMonitor CRD gets that.
    None: no Prometheus Operator, the ingest is not scraped (and that is no failure)."""
    for kind in (SERVICE_MONITOR, POD_MONITOR):
        if kind in served:
            return kind
    return None


def _labels(tenant: str) -> dict[str, str]:
    return {TENANT_LABEL: tenant, COMPONENT_LABEL: "ingest",
            "app.kubernetes.io/name": "kubiot-ingest", **MANAGED_BY}


def _selector(tenant: str) -> dict[str, str]:
    return {TENANT_LABEL: tenant, COMPONENT_LABEL: "ingest"}


@dataclass(frozen=True)
class IngestAvailability:
    """Whether the ingest Deployment serves, from its status as the deployment controller
    wrote it."""

    available: bool
    reason: str
    message: str


def ingest_availability(deployment: Mapping[str, Any] | None) -> IngestAvailability:
    """Available once the Deployment's current generation has at least one available pod (or
    it is scaled to zero on purpose)."""
    if deployment is None:
        return IngestAvailability(False, "Creating", "the ingest Deployment does not exist yet")
    meta, status = deployment.get("metadata") or {}, deployment.get("status") or {}
    name = f"{meta.get('namespace')}/{meta.get('name')}"
    wanted = int((deployment.get("spec") or {}).get("replicas", 1))
    available = int(status.get("availableReplicas") or 0)
    if status.get("observedGeneration", 0) < meta.get("generation", 1):
        return IngestAvailability(False, "RollingOut",
                                  f"Deployment {name} has not yet applied its latest spec")
    if wanted == 0:
        return IngestAvailability(True, "ScaledToZero", f"Deployment {name} has 0 replicas")
    if available == 0:
        return IngestAvailability(False, "Unavailable",
                                  f"Deployment {name}: none of {wanted} replicas available "
                                  "(kubectl describe deployment tells why)")
    return IngestAvailability(True, "Available",
                              f"Deployment {name}: {available} of {wanted} replicas available")


def ingest_objects(tenant: str, spec: TenantSpec, env: IngestEnvironment, *,
                   monitor: str | None) -> list[dict[str, Any]]:
    """Deployment, Service, PodDisruptionBudget, NetworkPolicy and the `monitor` kind
    (ServiceMonitor, PodMonitor or none, see `monitor_kind`) for a tenant's ingest; an empty
    list when ingest is disabled."""
    if not spec.ingest.enabled:
        return []
    namespace = tenant_namespace(tenant, spec)
    name = ingest_name(tenant)
    meta = {"name": name, "namespace": namespace, "labels": _labels(tenant)}
    objects = [
        _deployment(tenant, spec, env, meta),
        {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": {
            "selector": _selector(tenant),
            "ports": [{"name": "metrics", "port": INGEST_METRICS_PORT,
                       "targetPort": "metrics"}],
        }},
        {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta, "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": _selector(tenant)},
        }},
        _network_policy(tenant, env, meta),
    ]
    if monitor is not None:
        objects.append(_monitor(tenant, env, meta, monitor))
    return objects


def _monitor(tenant: str, env: IngestEnvironment, meta: dict[str, Any],
             kind: str) -> dict[str, Any]:
    endpoint = {"port": "metrics", "interval": "30s", "path": "/metrics"}
    endpoints = "podMetricsEndpoints" if kind == POD_MONITOR else "endpoints"
    return {
        "apiVersion": MONITORING_API, "kind": kind,
        "metadata": {**meta, "labels": {**env.monitor_labels, **meta["labels"]}},
        # job="kubiot-ingest" for every tenant, as the KubiotIngestDown alert expects.
        "spec": {"jobLabel": "app.kubernetes.io/name",
                 "selector": {"matchLabels": _selector(tenant)}, endpoints: [endpoint]},
    }


def _database_secret(tenant: str, spec: TenantSpec, env: IngestEnvironment) -> dict[str, str]:
    ref = spec.ingest.database.secret_ref
    if ref is not None:
        return {"name": ref.name, "key": ref.key}
    return {"name": env.platform_database_secret, "key": env.platform_database_key}


def _deployment(tenant: str, spec: TenantSpec, env: IngestEnvironment,
                meta: dict[str, Any]) -> dict[str, Any]:
    ingest = spec.ingest
    variables: list[dict[str, Any]] = [
        {"name": "KUBIOT_INGEST_TENANT", "value": tenant},
        {"name": "KUBIOT_INGEST_BROKER_HOST", "value": env.broker_host},
        {"name": "KUBIOT_INGEST_BROKER_PORT", "value": str(env.broker_port)},
        {"name": "KUBIOT_INGEST_BROKER_USERNAME", "value": ingest_username(tenant)},
        {"name": "KUBIOT_INGEST_BROKER_PASSWORD", "valueFrom": {"secretKeyRef": {
            "name": ingest_broker_secret_name(tenant), "key": "password"}}},
        {"name": "KUBIOT_INGEST_DATABASE_DSN", "valueFrom": {
            "secretKeyRef": _database_secret(tenant, spec, env)}},
        {"name": "KUBIOT_INGEST_DATABASE_SCHEMA", "value": database_schema(tenant, spec)},
        {"name": "KUBIOT_INGEST_RETENTION_DAYS", "value": str(ingest.database.retention_days)},
        {"name": "KUBIOT_INGEST_COMPRESS_AFTER_DAYS",
         "value": str(ingest.database.compress_after_days)},
        {"name": "KUBIOT_INGEST_BATCH_SIZE", "value": str(ingest.batch_size)},
        {"name": "KUBIOT_INGEST_BATCH_MAX_DELAY_MS", "value": str(ingest.batch_max_delay_ms)},
        {"name": "KUBIOT_INGEST_MAX_PAYLOAD_BYTES", "value": str(spec.quotas.max_payload_bytes)},
        {"name": "KUBIOT_INGEST_METRICS_PORT", "value": str(INGEST_METRICS_PORT)},
        {"name": "KUBIOT_INGEST_CLIENT_ID", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.name"}}},
    ]
    if spec.anomalies is not None:
        # Rules that are off still travel: the ingest sees them and evaluates nothing.
        variables.append({"name": "KUBIOT_INGEST_ANOMALY_RULES",
                          "value": spec.anomalies.to_json()})
    if ingest.influx is not None:
        variables += [
            {"name": "KUBIOT_INGEST_INFLUX_URL", "value": ingest.influx.url},
            {"name": "KUBIOT_INGEST_INFLUX_ORG", "value": ingest.influx.org},
            {"name": "KUBIOT_INGEST_INFLUX_BUCKET", "value": ingest.influx.bucket},
            {"name": "KUBIOT_INGEST_INFLUX_TOKEN", "valueFrom": {"secretKeyRef": {
                "name": ingest.influx.token_secret_ref.name,
                "key": ingest.influx.token_secret_ref.key}}},
        ]
    resources = ingest.resources.to_wire() if ingest.resources else {
        "requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}}
    probe = {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 5}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
        "spec": {
            "replicas": ingest.replicas,
            "selector": {"matchLabels": _selector(tenant)},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": _labels(tenant)},
                "spec": {
                    "automountServiceAccountToken": False,
                    # Long enough to flush and commit the last batch after SIGTERM.
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "ingest",
                        "image": ingest.image or env.image,
                        "env": variables,
                        "ports": [{"name": "metrics", "containerPort": INGEST_METRICS_PORT}],
                        "readinessProbe": probe,
                        "livenessProbe": {**probe, "httpGet": {"path": "/healthz",
                                                               "port": "metrics"},
                                          "failureThreshold": 6},
                        "resources": resources,
                        "securityContext": {"allowPrivilegeEscalation": False,
                                            "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}},
                    }],
                },
            },
        },
    }


def _network_policy(tenant: str, env: IngestEnvironment, meta: dict[str, Any]) -> dict[str, Any]:
    """Only Prometheus in the monitoring namespace may reach the ingest pods. Egress stays open:
    the broker and a managed database may live outside the cluster."""
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta,
        "spec": {
            "podSelector": {"matchLabels": _selector(tenant)},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"namespaceSelector": {"matchLabels": {
                    "kubernetes.io/metadata.name": env.monitoring_namespace}}}],
                "ports": [{"port": INGEST_METRICS_PORT, "protocol": "TCP"}],
            }],
        },
    }
