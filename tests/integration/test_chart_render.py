"""The Helm chart, rendered by a real helm: lint, schemas, RBAC, security and its single sources
(CRDs, alert rules, dashboards, operator settings)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubiot_operator.alerting import grafana_alert_rules
from kubiot_operator.crd.generate import generated_files
from kubiot_operator.kube.client import KINDS_BY_API
from kubiot_operator.models.tenant import TenantSpec
from kubiot_operator.reconcile.tenant import IngestEnvironment, ingest_objects
from kubiot_operator.settings import OperatorSettings
from tests.support.tools import REPO_ROOT, require_tool, run_tool

CHART = REPO_ROOT / "charts/kubiot"
PLATFORM_CHART = REPO_ROOT / "charts/kubiot-platform"
NAMESPACE = "kubiot-system"
KUBERNETES_VERSION = "1.30.0"
VALUE_FILES = {"default": None, "minikube": CHART / "values-minikube.yaml",
               "eks": CHART / "values-eks.yaml"}
MONITORING_KINDS = {"ServiceMonitor", "PrometheusRule"}


def _render(values: Path | None, *extra: str) -> list[dict[str, Any]]:
    args: list[str | Path] = ["template", "kubiot", CHART, "--namespace", NAMESPACE,
                              "--kube-version", KUBERNETES_VERSION, *extra]
    if values is not None:
        args += ["--values", values]
    result = run_tool(require_tool("helm"), *args)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="module", params=sorted(VALUE_FILES))
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    """The chart's objects with one of the values files."""
    return _render(VALUE_FILES[request.param])


@pytest.fixture(scope="module")
def default_objects() -> list[dict[str, Any]]:
    return _render(None)


def _one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def test_helm_lint_passes_with_every_values_file() -> None:
    helm = require_tool("helm")
    for name, values in VALUE_FILES.items():
        args: list[str | Path] = ["lint", "--strict", CHART]
        if values is not None:
            args += ["--values", values]
        result = run_tool(helm, *args)
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"


def test_rendered_objects_are_valid_kubernetes(rendered: list[dict[str, Any]]) -> None:
    for obj in rendered:
        if obj["kind"] in MONITORING_KINDS:
            continue
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_default_install_creates_the_operator_and_its_monitoring(
        default_objects: list[dict[str, Any]]) -> None:
    kinds = sorted(o["kind"] for o in default_objects)
    for kind in ("Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
                 "RoleBinding", "Service", "ServiceMonitor", "PrometheusRule", "NetworkPolicy",
                 "ConfigMap"):
        assert kind in kinds
    for obj in default_objects:
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]["name"]


def test_monitoring_objects_have_the_structure_prometheus_operator_requires(
        rendered: list[dict[str, Any]]) -> None:
    for obj in (o for o in rendered if o["kind"] in MONITORING_KINDS):
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        assert obj["metadata"]["name"] and obj["metadata"]["namespace"]
        if obj["kind"] == "ServiceMonitor":
            spec = obj["spec"]
            assert spec["selector"]["matchLabels"]
            for endpoint in spec["endpoints"]:
                assert set(endpoint) <= {"port", "path", "interval"}
                assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
        else:
            for group in obj["spec"]["groups"]:
                assert group["name"] and group["rules"]
                for rule in group["rules"]:
                    assert set(rule) <= {"alert", "record", "expr", "for", "labels",
                                         "annotations", "keep_firing_for"}
                    assert isinstance(rule["expr"], str) and ("alert" in rule) != (
                        "record" in rule)


def test_service_monitor_selects_the_metrics_service(
        default_objects: list[dict[str, Any]]) -> None:
    monitor = _one(default_objects, "ServiceMonitor")
    service = _one(default_objects, "Service")
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert any(p["name"] == "metrics" for p in service["spec"]["ports"])
    pod_labels = _one(default_objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_operator_runs_non_root_with_a_read_only_root_filesystem(
        rendered: list[dict[str, Any]]) -> None:
    deployment = _one(rendered, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "metrics"}
    # One operator at a time: kopf runs standalone, without peering.
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"


def test_operator_environment_is_exactly_the_operator_settings(
        rendered: list[dict[str, Any]]) -> None:
    """Every KUBIOT_* variable the chart sets is a setting, and together they validate."""
    (container,) = _one(rendered, "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {}
    for variable in container["env"]:
        # Values from Secrets and the downward API are filled in by the kubelet.
        env[variable["name"]] = variable.get("value", "from-the-cluster")
    fields = {f"KUBIOT_{name.upper()}" for name in OperatorSettings.model_fields}
    assert set(env) <= fields, f"not settings: {sorted(set(env) - fields)}"
    settings = OperatorSettings(**{k.removeprefix("KUBIOT_").lower(): v for k, v in env.items()})
    assert settings.metrics_port == container["ports"][0]["containerPort"]


def _rules(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return obj["rules"]  # type: ignore[no-any-return]


def _grants(rules: list[dict[str, Any]], group: str, resource: str) -> set[str]:
    verbs: set[str] = set()
    for rule in rules:
        if group in rule["apiGroups"] and resource in rule["resources"]:
            verbs |= set(rule["verbs"])
    return verbs


def test_rbac_has_no_wildcards(rendered: list[dict[str, Any]]) -> None:
    for obj in (o for o in rendered if o["kind"] in ("ClusterRole", "Role")):
        for rule in _rules(obj):
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"{obj['kind']}: {rule}"
            assert "resourceNames" not in rule or rule["resourceNames"]
            assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(
                rule["verbs"])


def test_cluster_role_covers_what_the_operator_creates_for_a_tenant(
        default_objects: list[dict[str, Any]]) -> None:
    rules = _rules(_one(default_objects, "ClusterRole"))
    environment = IngestEnvironment(image="ingest:1", broker_host="emqx", broker_port=1883,
                                    platform_database_secret="db", platform_database_key="dsn")
    for obj in ingest_objects("acme", TenantSpec(), environment):
        kind = KINDS_BY_API[(obj["apiVersion"], obj["kind"])]
        assert {"get", "create", "patch"} <= _grants(rules, kind.group, kind.plural), obj["kind"]
    assert {"create", "patch"} <= _grants(rules, "", "namespaces")
    # Device identities: by name only; listing every Secret of the cluster is not needed.
    assert _grants(rules, "", "secrets") == {"get", "create", "patch", "delete"}


def test_cluster_role_lets_kopf_watch_and_patch_every_kubiot_kind(
        default_objects: list[dict[str, Any]]) -> None:
    rules = _rules(_one(default_objects, "ClusterRole"))
    kubiot_kinds = [k for k in KINDS_BY_API.values() if k.group == "kubiot.io"]
    assert kubiot_kinds
    for kind in kubiot_kinds:
        assert _grants(rules, kind.group, kind.plural) == {"get", "list", "watch", "patch"}
        assert _grants(rules, kind.group, f"{kind.plural}/status") == {"get", "patch"}
    assert _grants(rules, "", "events") == {"create", "patch"}


def test_role_is_bound_in_the_operator_namespace_to_its_service_account(
        default_objects: list[dict[str, Any]]) -> None:
    account = _one(default_objects, "ServiceAccount")["metadata"]["name"]
    for binding_kind, role_kind in (("RoleBinding", "Role"),
                                    ("ClusterRoleBinding", "ClusterRole")):
        binding = _one(default_objects, binding_kind)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind,
                                      "name": _one(default_objects, role_kind)["metadata"]["name"]}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account,
                                        "namespace": NAMESPACE}]
    pod = _one(default_objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account


def test_prometheus_rule_is_the_promtool_tested_rules_file(
        default_objects: list[dict[str, Any]]) -> None:
    rules_file = yaml.safe_load((CHART / "files/alerts.yaml").read_text())
    assert _one(default_objects, "PrometheusRule")["spec"]["groups"] == rules_file["groups"]


def _dashboard_maps(objects: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return (o for o in objects if o["kind"] == "ConfigMap"
            and o["metadata"]["labels"].get("grafana_dashboard") == "1")


def test_dashboards_ship_as_labelled_config_maps_with_the_files_content(
        default_objects: list[dict[str, Any]]) -> None:
    shipped = {}
    for config_map in _dashboard_maps(default_objects):
        ((name, text),) = config_map["data"].items()
        shipped[name] = json.loads(text)
    files = {p.name: json.loads(p.read_text()) for p in (CHART / "dashboards").glob("*.json")}
    assert files and shipped == files


def test_grafana_alert_rules_ship_beside_the_dashboards_for_the_alerts_sidecar() -> None:
    objects = _render(None, "--set", "grafanaAlerts.datasourceUid=prom-1",
                      "--set", "grafanaAlerts.folder=IoT")
    [config_map] = [o for o in objects if o["kind"] == "ConfigMap"
                    and o["metadata"]["labels"].get("grafana_alert") == "1"]
    ((name, text),) = config_map["data"].items()
    assert name.endswith(".yaml") and "${" not in text
    provisioned = yaml.safe_load(text)
    generated = grafana_alert_rules(yaml.safe_load((CHART / "files/alerts.yaml").read_text()),
                                    datasource_uid="prom-1", folder="IoT")
    assert provisioned == generated


def test_toggles_leave_out_monitoring_dashboards_and_network_policy() -> None:
    objects = _render(None, "--set", "metrics.serviceMonitor.enabled=false",
                      "--set", "metrics.prometheusRule.enabled=false",
                      "--set", "dashboards.enabled=false", "--set", "grafanaAlerts.enabled=false",
                      "--set", "networkPolicy.enabled=false")
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"ServiceMonitor", "PrometheusRule", "NetworkPolicy", "ConfigMap"}
    assert "Deployment" in kinds


def test_an_unknown_broker_backend_is_refused() -> None:
    result = run_tool(require_tool("helm"), "template", "kubiot", CHART,
                      "--set", "broker.backend=rabbitmq")
    assert result.returncode != 0
    assert "broker.backend must be emqx or mosquitto" in result.stderr


def test_mosquitto_backend_takes_the_admin_password_from_a_secret() -> None:
    objects = _render(None, "--set", "broker.backend=mosquitto",
                      "--set", "broker.adminPasswordSecret=mosquitto-admin")
    (container,) = _one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {v["name"]: v for v in container["env"]}
    assert env["KUBIOT_BROKER"]["value"] == "mosquitto"
    assert env["KUBIOT_BROKER_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "mosquitto-admin", "key": "password"}
    assert not any(name.startswith("KUBIOT_EMQX_") for name in env)


def test_eks_values_annotate_the_service_account_for_irsa() -> None:
    objects = _render(VALUE_FILES["eks"])
    annotations = _one(objects, "ServiceAccount")["metadata"]["annotations"]
    assert annotations["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


def test_chart_crds_are_the_generated_crds() -> None:
    on_disk = {p.name: p.read_text() for p in (CHART / "crds").glob("*.yaml")}
    assert on_disk == generated_files(), "charts/kubiot/crds is stale: run `make crds`"
    repo = {p.name: p.read_text() for p in (REPO_ROOT / "crds").glob("*.yaml")}
    assert on_disk == repo


def test_crds_install_with_the_chart() -> None:
    objects = _render(None, "--include-crds")
    crds = {o["metadata"]["name"] for o in objects if o["kind"] == "CustomResourceDefinition"}
    assert crds == {Path(name).stem for name in generated_files()}


def test_optional_subcharts_are_declared_off_by_default() -> None:
    chart = yaml.safe_load((PLATFORM_CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((PLATFORM_CHART / "values.yaml").read_text())
    dependencies = {d.get("alias", d["name"]): d for d in chart["dependencies"]}
    assert dependencies["kubiot"]["repository"] == "file://../kubiot"
    for name in ("emqx", "timescaledb"):
        assert dependencies[name]["condition"] == f"{name}.enabled"
        assert values[name]["enabled"] is False
    kubiot_chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert "dependencies" not in kubiot_chart, "charts/kubiot must render offline"
    assert dependencies["kubiot"]["version"] == kubiot_chart["version"]


def test_role_lets_the_operator_manage_secrets_in_its_own_namespace_only(
        default_objects: list[dict[str, Any]]) -> None:
    role = _one(default_objects, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert {"get", "list", "watch", "create", "patch"} <= _grants(_rules(role), "", "secrets")


def test_notes_tell_what_to_do_next() -> None:
    result = run_tool(require_tool("helm"), "install", "kubiot", CHART, "--namespace", NAMESPACE,
                      "--dry-run=client")
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert f"kubectl -n {NAMESPACE} rollout status deployment/kubiot" in notes
    assert "create secret generic kubiot-emqx-api" in notes
    assert "kubectl apply -f manifests/examples/tenant.yaml" in notes
    assert "docs/operations.md" in notes
