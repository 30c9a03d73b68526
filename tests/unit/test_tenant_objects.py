"""The objects a Tenant's ingest pipeline is made of."""

from __future__ import annotations

from typing import Any

from kubiot_contract.health import parse_rules
from kubiot_operator.models.tenant import TenantSpec
from kubiot_operator.reconcile.tenant import (
    IngestEnvironment,
    database_schema,
    ingest_availability,
    ingest_objects,
    monitor_kind,
    namespace_refusal,
    tenant_namespace,
)

ENV = IngestEnvironment(image="kubiot/ingest:1", broker_host="mosquitto.kubiot-system",
                        broker_port=1883, platform_database_secret="kubiot-database",
                        platform_database_key="dsn")


def _by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in objects}


def _env(deployment: dict[str, Any]) -> dict[str, Any]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {v["name"]: v.get("value", v.get("valueFrom")) for v in container["env"]}


def test_default_tenant_gets_a_complete_ingest_pipeline() -> None:
    objects = _by_kind(ingest_objects("acme", TenantSpec(), ENV, monitor="ServiceMonitor"))
    assert set(objects) == {"Deployment", "Service", "ServiceMonitor", "PodDisruptionBudget",
                            "NetworkPolicy"}
    assert {o["metadata"]["namespace"] for o in objects.values()} == {"acme"}
    deployment = objects["Deployment"]
    assert deployment["spec"]["replicas"] == 2
    env = _env(deployment)
    assert env["KUBIOT_INGEST_TENANT"] == "acme"
    assert env["KUBIOT_INGEST_BROKER_USERNAME"] == "acme.svc.ingest"
    assert env["KUBIOT_INGEST_DATABASE_DSN"] == {
        "secretKeyRef": {"name": "kubiot-database", "key": "dsn"}}
    assert env["KUBIOT_INGEST_DATABASE_SCHEMA"] == "tenant_acme"
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert objects["Service"]["spec"]["selector"] == selector
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == selector


def test_tenant_spec_shapes_the_deployment() -> None:
    spec = TenantSpec.model_validate({
        "namespace": "acme-prod",
        "quotas": {"maxPayloadBytes": 4096},
        "ingest": {
            "replicas": 5, "image": "registry.local/ingest:2", "batchSize": 5000,
            "resources": {"limits": {"memory": "1Gi"}},
            "database": {"secretRef": {"name": "acme-db", "key": "url"}, "schema": "acme"},
            "influx": {"url": "http://influx:8086", "org": "acme", "bucket": "telemetry",
                       "tokenSecretRef": {"name": "acme-influx", "key": "token"}},
        },
    })
    assert tenant_namespace("acme", spec) == "acme-prod"
    assert database_schema("acme", spec) == "acme"
    deployment = _by_kind(ingest_objects("acme", spec, ENV, monitor="ServiceMonitor"))["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert deployment["spec"]["replicas"] == 5
    assert container["image"] == "registry.local/ingest:2"
    assert container["resources"] == {"limits": {"memory": "1Gi"}}
    env = _env(deployment)
    assert env["KUBIOT_INGEST_BATCH_SIZE"] == "5000"
    assert env["KUBIOT_INGEST_MAX_PAYLOAD_BYTES"] == "4096"
    assert env["KUBIOT_INGEST_DATABASE_DSN"] == {"secretKeyRef": {"name": "acme-db", "key": "url"}}
    assert env["KUBIOT_INGEST_INFLUX_TOKEN"] == {
        "secretKeyRef": {"name": "acme-influx", "key": "token"}}


def test_ingest_pods_run_unprivileged_with_a_read_only_root() -> None:
    objects = ingest_objects("acme", TenantSpec(), ENV, monitor="ServiceMonitor")
    deployment = _by_kind(objects)["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_disabled_ingest_has_no_objects() -> None:
    spec = TenantSpec.model_validate({"ingest": {"enabled": False}})
    assert ingest_objects("acme", spec, ENV, monitor="ServiceMonitor") == []


def test_the_ingest_is_monitored_with_what_the_cluster_serves() -> None:
    assert monitor_kind({"ServiceMonitor", "PodMonitor", "Probe"}) == "ServiceMonitor"
    assert monitor_kind({"PodMonitor"}) == "PodMonitor"
    assert monitor_kind(set()) is None
    without = _by_kind(ingest_objects("acme", TenantSpec(), ENV, monitor=None))
    assert set(without) == {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"}
    pods = _by_kind(ingest_objects("acme", TenantSpec(), ENV, monitor="PodMonitor"))
    assert pods["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_monitors_carry_the_labels_prometheus_selects_and_admit_its_namespace() -> None:
    env = IngestEnvironment(image="kubiot/ingest:1", broker_host="emqx", broker_port=1883,
                            platform_database_secret="kubiot-database",
                            platform_database_key="dsn", monitoring_namespace="observability",
                            monitor_labels={"release": "kube-prometheus-stack"})
    objects = _by_kind(ingest_objects("acme", TenantSpec(), env, monitor="ServiceMonitor"))
    labels = objects["ServiceMonitor"]["metadata"]["labels"]
    assert labels["release"] == "kube-prometheus-stack"
    assert labels["kubiot.io/tenant"] == "acme"
    assert "release" not in objects["Service"]["metadata"]["labels"]
    allowed = objects["NetworkPolicy"]["spec"]["ingress"][0]["from"][0]["namespaceSelector"]
    assert allowed == {"matchLabels": {"kubernetes.io/metadata.name": "observability"}}


def test_a_tenant_uses_only_a_namespace_it_created() -> None:
    ours = {"metadata": {"name": "acme", "labels": {"kubiot.io/tenant": "acme"},
                         "ownerReferences": [{"kind": "Tenant", "name": "acme", "uid": "u1"}]}}
    assert namespace_refusal("acme", "u1", "acme", None) is None
    assert namespace_refusal("acme", "u1", "acme", ours) is None
    # A Tenant deleted and created again has a new uid: the old namespace is not its own.
    assert namespace_refusal("acme", "u2", "acme", ours) is not None
    other = namespace_refusal("globex", "u3", "acme", ours)
    assert other is not None and "belongs to Tenant acme" in other
    system = namespace_refusal("acme", "u1", "kube-system", {"metadata": {"name": "kube-system"}})
    assert system is not None and "did not create" in system


def test_ingest_availability_reads_the_deployment_status() -> None:
    def deployment(generation: int, replicas: int, **status: int) -> dict[str, Any]:
        return {"metadata": {"name": "acme-ingest", "namespace": "acme",
                             "generation": generation},
                "spec": {"replicas": replicas}, "status": status}

    assert ingest_availability(None).reason == "Creating"
    assert ingest_availability(deployment(2, 2, observedGeneration=1,
                                          availableReplicas=2)).reason == "RollingOut"
    assert ingest_availability(deployment(1, 2, observedGeneration=1)).reason == "Unavailable"
    assert ingest_availability(deployment(1, 0, observedGeneration=1)).available
    ready = ingest_availability(deployment(1, 2, observedGeneration=1, availableReplicas=1))
    assert ready.available and "1 of 2" in ready.message


def test_anomaly_rules_reach_the_ingest_as_the_json_it_parses() -> None:
    spec = TenantSpec.model_validate({"anomalies": {
        "bounds": [{"metric": "pressure_bar", "min": 0.5, "max": 12}],
        "zscore": [{"metric": "*", "threshold": 6}],
        "silence": {"intervals": 4}}})
    deployment = _by_kind(ingest_objects("acme", spec, ENV, monitor="ServiceMonitor"))["Deployment"]
    rules = _env(deployment)["KUBIOT_INGEST_ANOMALY_RULES"]
    assert parse_rules(rules) == spec.anomalies
    plain = _by_kind(ingest_objects("acme", TenantSpec(), ENV, monitor="ServiceMonitor"))
    assert "KUBIOT_INGEST_ANOMALY_RULES" not in _env(plain["Deployment"])
