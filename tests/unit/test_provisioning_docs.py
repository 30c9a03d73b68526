"""docs/provisioning.md and the example manifests say what provisioning by claim does."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubiot_operator.crd.validate import validate_resource
from kubiot_operator.models import kind_named
from kubiot_operator.models.tenant import ProvisioningSpec
from kubiot_operator.reconcile.provisioning import (
    ANSWERED_FILES,
    PendingReason,
    RefusalReason,
)

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "provisioning.md").read_text()


def _yaml_blocks() -> list[dict[str, Any]]:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC, flags=re.S)
    return [document for block in blocks for document in yaml.safe_load_all(block)
            if isinstance(document, dict) and "kind" in document]


@pytest.mark.parametrize("resource", _yaml_blocks(), ids=lambda r: r["kind"])
def test_every_resource_in_the_doc_is_admitted(resource: dict[str, Any]) -> None:
    defaulted = validate_resource(resource)
    kind_named(resource["kind"]).spec.model_validate(defaulted["spec"])


def test_the_doc_names_every_refusal_and_pending_reason_and_answer_field() -> None:
    for reason in RefusalReason:
        assert f"| `{reason.value}` |" in DOC, reason
    for pending in PendingReason:
        assert f'"reason": "{pending.value}"' in DOC, pending
    for field in ANSWERED_FILES.values():
        assert f'"{field}"' in DOC, field
    for metric in ("kubiot_provisioning_answers_total", "kubiot_devices_provisioned_total"):
        assert metric in DOC


def test_the_example_tenant_provisions_the_serials_the_local_factory_makes() -> None:
    tenant = yaml.safe_load((ROOT / "manifests" / "examples" / "tenant.yaml").read_text())
    spec = ProvisioningSpec.model_validate(tenant["spec"]["provisioning"])
    assert spec.enabled and [c.name for c in spec.claims] == ["factory-line-1"]
    assert spec.name_pattern is not None
    assert re.fullmatch(spec.name_pattern, "sn-0001")  # `kubiot local factory`'s first serial
    assert not re.fullmatch(spec.name_pattern, "pump-7")
