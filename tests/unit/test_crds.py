"""The generated CRDs: fresh, structural, with status, printer columns and working CEL rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml

from kubiot_operator.crd.generate import HEADER, crd, generated_docs, generated_files
from kubiot_operator.crd.validate import validator_for
from kubiot_operator.models import KINDS, ResourceKind

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "crds"


def test_committed_crds_are_what_make_crds_generates() -> None:
    expected = generated_files()
    on_disk = {p.name: p.read_text() for p in CRD_DIR.glob("*.yaml")}
    assert set(on_disk) == set(expected), "crds/ has missing or extra files: run `make crds`"
    for name, text in expected.items():
        assert on_disk[name] == text, f"crds/{name} is stale: run `make crds`"
        assert text.startswith(HEADER)


def test_documents_generated_from_the_models_are_current() -> None:
    for name, text in generated_docs().items():
        assert (ROOT / "docs" / name).read_text() == text, f"docs/{name} is stale: `make crds`"


def _nodes(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path or "<root>", schema)]
    for name, prop in schema.get("properties", {}).items():
        found += _nodes(prop, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        found += _nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        found += _nodes(schema["additionalProperties"], f"{path}.*")
    return found


def _schema(kind: ResourceKind) -> dict[str, Any]:
    return crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_schema_is_structural(kind: ResourceKind) -> None:
    for path, node in _nodes(_schema(kind)):
        if node.get("x-kubernetes-int-or-string"):
            # The one union a structural schema allows (resource quantities have it).
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
            assert "type" not in node, path
            continue
        assert not {"$ref", "anyOf", "oneOf", "allOf", "not", "$defs"} & set(node), path
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        assert not ("properties" in node and "additionalProperties" in node), path
        assert "nullable" not in node and "title" not in node, path
        if node.get("type") == "array":
            assert "maxItems" in node or not path.startswith(".spec"), f"{path}: unbounded list"


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_crd_serves_status_printer_columns_and_names(kind: ResourceKind) -> None:
    document = crd(kind)
    version = document["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert version["served"] and version["storage"]
    names = document["spec"]["names"]
    assert names["shortNames"] and "kubiot" in names["categories"]
    columns = version["additionalPrinterColumns"]
    assert [c["name"] for c in columns][-1] == "Age"
    assert any(c["jsonPath"] == ".status.phase" for c in columns)
    schema = _schema(kind)
    for column in columns:
        fields = column["jsonPath"].split("[")[0].strip(".").split(".")
        if fields[0] == "metadata":
            continue
        node = schema
        for field in fields:
            assert field in node.get("properties", {}), f"{column['jsonPath']} is not in the schema"
            node = node["properties"][field]


def test_device_printer_columns_answer_what_kubectl_get_devices_should() -> None:
    device = next(k for k in KINDS if k.kind == "Device")
    default_columns = [c.name for c in device.printer_columns if c.priority == 0]
    assert default_columns == ["Phase", "Online", "Firmware", "Cert-Expiry", "Age"]


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_every_cel_rule_compiles_and_defaults_satisfy_the_schema(kind: ResourceKind) -> None:
    env = celpy.Environment()
    for path, node in _nodes(_schema(kind)):
        for rule in node.get("x-kubernetes-validations", []):
            env.compile(rule["rule"])
            assert rule["message"], path
        if "default" in node:
            # The API server refuses CRDs whose defaults its own schema would reject.
            wrapper = {"type": "object", "properties": {"v": node}}
            from jsonschema import Draft7Validator

            assert not list(Draft7Validator(wrapper).iter_errors({"v": node["default"]})), path


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_crd_files_parse_as_one_yaml_document(kind: ResourceKind) -> None:
    documents = list(yaml.safe_load_all((CRD_DIR / f"{kind.crd_name}.yaml").read_text()))
    assert documents == [crd(kind)]


def test_minimal_device_gets_the_documented_defaults() -> None:
    device = {"apiVersion": "kubiot.io/v1alpha1", "kind": "Device",
              "metadata": {"name": "d1", "namespace": "acme"}, "spec": {}}
    defaulted = validator_for("Device").validate(device)
    assert defaulted["spec"] == {"suspended": False, "identity": {"type": "GeneratedKey"}}
