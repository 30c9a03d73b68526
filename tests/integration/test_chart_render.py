"""The Helm chart, rendered by a real helm: lint, schemas, RBAC, security and its single sources
(CRDs, alert rules, dashboards, operator settings)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubiot_operator.alerting import grafana_alert_rules
from kubiot_operator.controllers.objects import owner_reference
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
    for kind in ("Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                 "Service", "ServiceMonitor", "PrometheusRule", "NetworkPolicy", "ConfigMap"):
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
    for obj in ingest_objects("acme", TenantSpec(), environment, monitor="ServiceMonitor") + \
            ingest_objects("acme", TenantSpec(), environment, monitor="PodMonitor")[-1:]:
        kind = KINDS_BY_API[(obj["apiVersion"], obj["kind"])]
        assert {"create", "patch", "delete"} <= _grants(rules, kind.group, kind.plural), \
            obj["kind"]
    assert {"create", "patch"} <= _grants(rules, "", "namespaces")
    # Device identities: by name only; listing every Secret of the cluster is not needed.
    assert _grants(rules, "", "secrets") == {"get", "create", "patch", "delete"}
    # Provisioning by claim creates Devices.
    assert "create" in _grants(rules, "kubiot.io", "devices")


def test_cluster_role_lets_kopf_watch_and_patch_every_kubiot_kind(
        default_objects: list[dict[str, Any]]) -> None:
    rules = _rules(_one(default_objects, "ClusterRole"))
    kubiot_kinds = [k for k in KINDS_BY_API.values() if k.group == "kubiot.io"]
    assert kubiot_kinds
    for kind in kubiot_kinds:
        assert {"list", "watch", "patch"} <= _grants(rules, kind.group, kind.plural)
        assert _grants(rules, kind.group, f"{kind.plural}/status") == {"patch"}
    assert _grants(rules, "", "events") == {"create"}


def test_cluster_role_is_bound_to_the_operators_service_account(
        default_objects: list[dict[str, Any]]) -> None:
    account = _one(default_objects, "ServiceAccount")["metadata"]["name"]
    for binding_kind, role_kind in (("ClusterRoleBinding", "ClusterRole"),):
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


def test_the_platforms_emqx_binds_sessions_to_certificates_and_refuses_malformed_packets(
        ) -> None:
    emqx = yaml.safe_load((PLATFORM_CHART / "values.yaml").read_text())["emqx"]["emqxConfig"]
    assert emqx["EMQX_MQTT__PEER_CERT_AS_USERNAME"] == emqx["EMQX_MQTT__PEER_CERT_AS_CLIENTID"] \
        == "cn"
    assert emqx["EMQX_MQTT__STRICT_MODE"] == "true"  # a topic that is not UTF-8 is refused
    assert emqx["EMQX_AUTHORIZATION__NO_MATCH"] == "deny"


def test_no_role_beyond_the_cluster_role(default_objects: list[dict[str, Any]]) -> None:
    """The operator's Secrets are read and written by name, never listed or watched: the
    ClusterRole covers its own namespace too."""
    assert not [o for o in default_objects if o["kind"] in ("Role", "RoleBinding")]


def test_notes_tell_what_to_do_next() -> None:
    result = run_tool(require_tool("helm"), "install", "kubiot", CHART, "--namespace", NAMESPACE,
                      "--dry-run=client")
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert f"kubectl -n {NAMESPACE} rollout status deployment/kubiot" in notes
    assert "create secret generic kubiot-emqx-api" in notes
    assert "kubectl apply -f manifests/examples/tenant.yaml" in notes
    assert "docs/operations.md" in notes


def test_eks_ingest_monitors_get_the_release_label_and_admit_the_monitoring_namespace() -> None:
    deployment = _one(_render(VALUE_FILES["eks"]), "Deployment")
    env = {v["name"]: v.get("value") for v in
           deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    settings = OperatorSettings.model_validate({
        "ingest_monitor_labels": json.loads(env["KUBIOT_INGEST_MONITOR_LABELS"]),
        "monitoring_namespace": env["KUBIOT_MONITORING_NAMESPACE"]})
    environment = IngestEnvironment(
        image="ingest:1", broker_host="emqx", broker_port=1883, platform_database_secret="db",
        platform_database_key="dsn", monitoring_namespace=settings.monitoring_namespace,
        monitor_labels=settings.ingest_monitor_labels)
    objects = {o["kind"]: o for o in ingest_objects("acme", TenantSpec(), environment,
                                                     monitor="ServiceMonitor")}

    assert objects["ServiceMonitor"]["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    allowed = objects["NetworkPolicy"]["spec"]["ingress"][0]["from"][0]["namespaceSelector"]
    assert allowed["matchLabels"]["kubernetes.io/metadata.name"] == "monitoring"


def _claimed_minor_versions() -> list[int]:
    """Kubernetes minor versions the chart claims, up to the newest kubernetes-validate knows."""
    claim = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    match = re.fullmatch(r">=\s*1\.(\d+)\.0-0", claim)
    assert match, f"unexpected kubeVersion {claim!r}"
    newest = int(kubernetes_validate.latest_version().split(".")[1])
    return list(range(int(match[1]), newest + 1))


def test_chart_and_crds_validate_on_every_kubernetes_version_the_chart_claims() -> None:
    objects = [o for values in VALUE_FILES.values()
               for o in _render(values, "--include-crds") if o["kind"] not in MONITORING_KINDS]
    for minor in _claimed_minor_versions():
        for obj in objects:
            try:
                kubernetes_validate.validate(obj, f"1.{minor}.0", strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{obj['kind']} {obj['metadata']['name']} on 1.{minor}: "
                            f"{str(exc)[:300]}")


def test_terraform_accepts_exactly_the_kubernetes_versions_the_chart_claims() -> None:
    variables = (REPO_ROOT / "terraform" / "variables.tf").read_text()
    block = variables[variables.index('variable "kubernetes_version"'):]
    pattern = re.search(r'regex\("(.+?)", var\.kubernetes_version\)', block)
    assert pattern is not None
    accepted = re.compile(pattern[1].replace("\\\\", "\\"))
    oldest = _claimed_minor_versions()[0]
    assert not accepted.fullmatch(f"1.{oldest - 1}")
    for minor in range(oldest, oldest + 15):
        assert accepted.fullmatch(f"1.{minor}"), f"1.{minor}"


def test_owner_references_need_no_right_the_cluster_role_lacks(
        default_objects: list[dict[str, Any]]) -> None:
    """Under OwnerReferencesPermissionEnforcement (OpenShift), `blockOwnerDeletion: true`
    needs `update` on the owner's finalizers."""
    rules = _rules(_one(default_objects, "ClusterRole"))
    for plural, kind in (("tenants", "Tenant"), ("devices", "Device"), ("gateways", "Gateway")):
        reference = owner_reference({"apiVersion": "kubiot.io/v1alpha1", "kind": kind,
                                     "metadata": {"name": "owner", "uid": "u1"}})
        if reference.get("blockOwnerDeletion"):
            assert "update" in _grants(rules, "kubiot.io", f"{plural}/finalizers"), kind


@pytest.mark.parametrize(("values", "namespace"), [
    ((), "emqx"),
    (("--set", "broker.backend=mosquitto"), NAMESPACE),
    (("--set", "broker.trustNamespace=brokers"), "brokers"),
])
def test_the_trust_bundle_goes_to_the_brokers_namespace(values: tuple[str, ...],
                                                        namespace: str) -> None:
    deployment = _one(_render(None, *values), "Deployment")
    env = {v["name"]: v.get("value") for v in
           deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBIOT_BROKER_TRUST_NAMESPACE"] == namespace


def test_the_crl_url_keeps_answering_while_the_operator_is_not_ready() -> None:
    objects = _render(None)
    deployment = _one(objects, "Deployment")
    env = {v["name"]: v.get("value") for v in
           deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    host = env["KUBIOT_CRL_URL_TEMPLATE"].removeprefix("http://").split(".")[0]
    (service,) = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == host]
    assert service["spec"]["publishNotReadyAddresses"] is True


@pytest.mark.parametrize(("setting", "complaint"), [
    ("broker.backend=rabbitmq", "/broker/backend"),
    ("operator.maxWorkers=many", "/operator/maxWorkers"),
    ("operator.logFormat=xml", "/operator/logFormat"),
    ("broker.emqx.crlDistribtion=false", "crlDistribtion"),  # a typo is not silently ignored
])
def test_values_schema_refuses_a_wrong_value_before_anything_is_rendered(
        setting: str, complaint: str) -> None:
    result = run_tool(require_tool("helm"), "template", "kubiot", CHART, "--set", setting)
    assert result.returncode != 0
    assert complaint in result.stderr


def test_values_schema_documents_every_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def mismatches(node: dict[str, Any], described: dict[str, Any], where: str) -> list[str]:
        properties = described.get("properties")
        if properties is None:  # free-form (resources, labels, security contexts)
            return []
        found = [f"{where}{k}: not in the schema" for k in node if k not in properties]
        found += [f"{where}{k}: not in values.yaml" for k in properties
                  if k not in node and k not in ("global", "enabled")]
        for key, value in node.items():
            if isinstance(value, dict) and key in properties:
                found += mismatches(value, properties[key], f"{where}{key}.")
        return found

    assert mismatches(values, schema, "") == []
