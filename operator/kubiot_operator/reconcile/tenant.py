"""What a Tenant needs in the cluster: its namespace and its ingest pipeline objects."""

from __future__ import annotations

from dataclasses import dataclass
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


def namespace_object(tenant: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": namespace, "labels": {TENANT_LABEL: tenant, **MANAGED_BY}},
    }


@dataclass(frozen=True)
class IngestEnvironment:
    """Platform facts the ingest Deployment needs besides the tenant's spec."""

    image: str
    broker_host: str
    broker_port: int
    platform_database_secret: str
    platform_database_key: str
    monitoring_namespace: str = "monitoring"


def _labels(tenant: str) -> dict[str, str]:
    return {TENANT_LABEL: tenant, COMPONENT_LABEL: "ingest",
            "app.kubernetes.io/name": "kubiot-ingest", **MANAGED_BY}


def _selector(tenant: str) -> dict[str, str]:
    return {TENANT_LABEL: tenant, COMPONENT_LABEL: "ingest"}


def ingest_objects(tenant: str, spec: TenantSpec, env: IngestEnvironment) -> list[dict[str, Any]]:
    """Deployment, Service, ServiceMonitor, PodDisruptionBudget and NetworkPolicy for a tenant's
    ingest; an empty list when ingest is disabled."""
    if not spec.ingest.enabled:
        return []
    namespace = tenant_namespace(tenant, spec)
    name = ingest_name(tenant)
    meta = {"name": name, "namespace": namespace, "labels": _labels(tenant)}
    return [
        _deployment(tenant, spec, env, meta),
        {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": {
            "selector": _selector(tenant),
            "ports": [{"name": "metrics", "port": INGEST_METRICS_PORT,
                       "targetPort": "metrics"}],
        }},
        {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": meta,
         "spec": {
             # job="kubiot-ingest" for every tenant, as the KubiotIngestDown alert expects.
             "jobLabel": "app.kubernetes.io/name",
             "selector": {"matchLabels": _selector(tenant)},
             "endpoints": [{"port": "metrics", "interval": "30s", "path": "/metrics"}],
         }},
        {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta, "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": _selector(tenant)},
        }},
        _network_policy(tenant, env, meta),
    ]


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
