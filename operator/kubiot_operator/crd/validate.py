"""Validate a resource against its generated CRD, as the API server would admit it.

The API server defaults, checks the OpenAPI schema and evaluates the CEL rules. The local stack
has no API server and the operator should not trust an old one without CEL, so both run this:
defaults from the schema, JSON-schema validation (unknown fields refused, as `kubectl apply`
does with strict field validation), then every `x-kubernetes-validations` rule with a CEL
interpreter. The rules are the ones in the CRD; there is no second copy of them.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

import celpy
from celpy.adapter import json_to_cel
from celpy.celtypes import BoolType
from celpy.evaluation import CELEvalError
from jsonschema import Draft7Validator
from jsonschema.exceptions import ValidationError

from kubiot_operator.crd.generate import crd
from kubiot_operator.models import KINDS, ResourceKind, kind_named


@dataclass(frozen=True)
class FieldError:
    """One reason a resource is invalid, with the field it concerns."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class ResourceInvalid(ValueError):
    """A resource the API server would refuse; `errors` names each field and why."""

    def __init__(self, name: str, errors: list[FieldError]) -> None:
        super().__init__(f"{name} is invalid: " + "; ".join(str(e) for e in errors))
        self.errors = errors


class CRDValidator:
    """Defaulting and validation for one kind, built from its CRD's openAPIV3Schema."""

    def __init__(self, kind: ResourceKind) -> None:
        self.kind = kind
        self.schema: dict[str, Any] = crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        self._validator = Draft7Validator(_strict(self.schema))

    def with_defaults(self, obj: dict[str, Any]) -> dict[str, Any]:
        """A copy of the object with the schema's defaults filled in."""
        defaulted = copy.deepcopy(obj)
        _apply_defaults(self.schema, defaulted)
        return defaulted

    def errors(self, obj: dict[str, Any]) -> list[FieldError]:
        """Every reason the object would be refused; empty when it is valid."""
        defaulted = self.with_defaults(obj)
        errors = [
            error
            for schema_error in sorted(self._validator.iter_errors(defaulted), key=_error_order)
            for error in _explain(schema_error)
        ]
        if errors:  # CEL rules assume the shape the schema promises
            return errors
        return list(_cel_errors(self.schema, defaulted, ""))

    def validate(self, obj: dict[str, Any]) -> dict[str, Any]:
        """The defaulted object, or ResourceInvalid naming each bad field."""
        errors = self.errors(obj)
        if errors:
            raise ResourceInvalid(_describe(obj, self.kind), errors)
        return self.with_defaults(obj)


@cache
def validator_for(kind: str) -> CRDValidator:
    return CRDValidator(kind_named(kind))


def validate_resource(obj: dict[str, Any]) -> dict[str, Any]:
    """Validate any kubiot resource by its apiVersion and kind; return it with defaults."""
    kind = obj.get("kind")
    known = {k.kind: k for k in KINDS}
    if kind not in known:
        raise ResourceInvalid(
            str(kind), [FieldError("kind", f"must be one of {', '.join(sorted(known))}")])
    if obj.get("apiVersion") != known[kind].api_version:
        raise ResourceInvalid(_describe(obj, known[kind]), [FieldError(
            "apiVersion", f"must be {known[kind].api_version}, not {obj.get('apiVersion')!r}")])
    return validator_for(kind).validate(obj)


def _describe(obj: dict[str, Any], kind: ResourceKind) -> str:
    name = (obj.get("metadata") or {}).get("name", "<unnamed>")
    return f"{kind.kind} {name}"


# --- schema validation -------------------------------------------------------------------------

def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with unknown fields refused wherever it lists the fields."""
    out = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
        out["additionalProperties"] = False
    if isinstance(schema.get("items"), dict):
        out["items"] = _strict(schema["items"])
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(schema["additionalProperties"])
    return out


def _path(parts: Any) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<root>"


def _join(base: str, name: str) -> str:
    return name if base == "<root>" else f"{base}.{name}"


def _error_order(error: ValidationError) -> str:
    return _path(error.absolute_path)


def _explain(error: ValidationError) -> Iterator[FieldError]:
    where = _path(error.absolute_path)
    instance = error.instance
    if error.validator == "required" and isinstance(instance, dict):
        for name in error.validator_value:  # type: ignore[union-attr]
            if name not in instance:
                yield FieldError(_join(where, name), "required field is missing")
    elif error.validator == "additionalProperties" and isinstance(instance, dict):
        known = set(error.schema.get("properties", {}))  # type: ignore[union-attr]
        for name in sorted(set(instance) - known):
            yield FieldError(_join(where, name), "unknown field")
    elif error.validator == "type":
        yield FieldError(where, f"must be of type {error.validator_value}, "
                                f"not {type(instance).__name__} {instance!r}")
    else:
        yield FieldError(where, error.message)


def _apply_defaults(schema: dict[str, Any], value: Any) -> None:
    if isinstance(value, dict) and "properties" in schema:
        for name, prop in schema["properties"].items():
            if name not in value and "default" in prop:
                value[name] = copy.deepcopy(prop["default"])
            if name in value:
                _apply_defaults(prop, value[name])
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for item in value.values():
            _apply_defaults(schema["additionalProperties"], item)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _apply_defaults(schema["items"], item)


# --- CEL ---------------------------------------------------------------------------------------

_CEL = celpy.Environment()


@cache
def _program(rule: str) -> Any:
    return _CEL.program(_CEL.compile(rule))


@lru_cache(maxsize=8192)
def _rule_holds(rule: str, value_json: str) -> bool:
    """A rule's verdict on a value (as canonical JSON). Remembered: a fleet's manifests repeat
    the same specs thousands of times, and the interpreter takes milliseconds per rule."""
    try:
        result = _program(rule).evaluate({"self": json_to_cel(json.loads(value_json))})
    except CELEvalError:
        return False
    return isinstance(result, BoolType) and bool(result)


@cache
def _fields_read(rule: str) -> frozenset[str] | None:
    """The fields of `self` a rule reads, when it reads `self` only through them."""
    if re.search(r"\bself\b(?!\.)", rule):
        return None
    return frozenset(re.findall(r"\bself\.(\w+)", rule))


def _cel_errors(schema: dict[str, Any], value: Any, where: str) -> Iterator[FieldError]:
    for validation in schema.get("x-kubernetes-validations", []):
        read = _fields_read(validation["rule"])
        # Only declared properties narrow `self`: `self.all(…)` on a map reads every key.
        seen = value
        if (read is not None and isinstance(value, dict)
                and read <= schema.get("properties", {}).keys()):
            seen = {k: v for k, v in value.items() if k in read}
        if not _rule_holds(validation["rule"], json.dumps(seen, sort_keys=True)):
            field = where + validation.get("fieldPath", "")
            yield FieldError(field.lstrip(".") or "<root>", validation["message"])
    if isinstance(value, dict) and "properties" in schema:
        for name, prop in schema["properties"].items():
            if name in value:
                yield from _cel_errors(prop, value[name], f"{where}.{name}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            yield from _cel_errors(schema["additionalProperties"], item, f"{where}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            yield from _cel_errors(schema["items"], item, f"{where}[{index}]")
