"""Remembered CEL verdicts give the same answers as evaluating every rule afresh."""

from __future__ import annotations

from typing import Any

import pytest

from kubiot_operator.crd.validate import ResourceInvalid, _fields_read, validate_resource


def device(name: str) -> dict[str, Any]:
    return {"apiVersion": "kubiot.io/v1alpha1", "kind": "Device",
            "metadata": {"name": name, "namespace": "acme"}, "spec": {"model": "sensor-v2"}}


def test_each_name_is_judged_on_its_own_even_when_specs_repeat() -> None:
    for _ in range(2):  # the second round answers from memory
        validate_resource(device("pump-1"))
        with pytest.raises(ResourceInvalid, match=r"metadata\.name"):
            validate_resource(device("Pump_1"))


def test_only_rules_reading_self_through_fields_narrow_it() -> None:
    assert _fields_read("self.metadata.name.matches('^a$')") == frozenset({"metadata"})
    assert _fields_read("size(self) <= 3") is None
    assert _fields_read("self.all(k, k != 'x')") == frozenset({"all"})  # not a property:
    # such a rule sees the whole value, since `all` names no declared property
