"""Turn a pydantic model's JSON schema into a structural OpenAPI v3 schema for a CRD.

Kubernetes wants every node typed, no `$ref`, no `anyOf` of alternative types, no
`additionalProperties` beside `properties`, and free-form JSON marked with
`x-kubernetes-preserve-unknown-fields`. Pydantic's schema is close; this closes the gap.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

# Keys kept from pydantic's output; everything else (title, $defs, ...) is dropped.
_KEPT_KEYS = frozenset({
    "type", "format", "description", "enum", "pattern", "minimum", "maximum", "minLength",
    "maxLength", "minItems", "maxItems", "minProperties", "maxProperties", "default", "items",
    "properties", "required", "additionalProperties", "nullable",
})


# Order of keys in the output, so the generated YAML reads top-down: what, then limits, then parts.
_KEY_ORDER = (
    "type", "description", "format", "enum", "default", "pattern", "minimum", "maximum",
    "minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
    "nullable", "required", "properties", "items", "additionalProperties",
)


class SchemaError(ValueError):
    """A model uses a construct that has no structural OpenAPI form."""


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a model, as it goes into a CRD."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    definitions = raw.pop("$defs", {})
    return _convert(raw, definitions, path=model.__name__)


def _resolve(node: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    target = definitions[ref.removeprefix("#/$defs/")]
    # Keys beside a $ref (default, description) override the referenced definition.
    return {**target, **{k: v for k, v in node.items() if k != "$ref"}}


def _convert(node: dict[str, Any], definitions: dict[str, Any], path: str) -> dict[str, Any]:
    node = _resolve(node, definitions)
    if node.get("x-kubernetes-int-or-string"):
        return _int_or_string(node, definitions)
    if "anyOf" in node:
        node = _collapse_any_of(node, definitions, path)
    if "const" in node:
        node = {**node, "enum": [node["const"]]}

    out: dict[str, Any] = {k: v for k, v in node.items() if k in _KEPT_KEYS}
    out.update({k: v for k, v in node.items() if k.startswith("x-kubernetes-")})

    if "exclusiveMinimum" in node or "exclusiveMaximum" in node:
        raise SchemaError(f"{path}: use ge/le instead of gt/lt (OpenAPI v3.0 bounds)")
    if "default" in out:
        out["default"] = _without_nulls(out["default"])

    if not node:  # `Any`: any JSON value
        return {"x-kubernetes-preserve-unknown-fields": True}
    if "type" not in out:
        if "enum" in out:
            out["type"] = "string"
        else:
            raise SchemaError(f"{path}: no type in {node}")

    if "description" in out:
        out["description"] = " ".join(out["description"].split())
    if out["type"] == "object":
        _convert_object(node, out, definitions, path)
    elif out["type"] == "array":
        out["items"] = _convert(node.get("items", {}), definitions, f"{path}[]")
    return _ordered(out)


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    rank = {key: i for i, key in enumerate(_KEY_ORDER)}
    return dict(sorted(node.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def _convert_object(node: dict[str, Any], out: dict[str, Any], definitions: dict[str, Any],
                    path: str) -> None:
    extra = node.get("additionalProperties")
    if "patternProperties" in node:
        # Map keys constrained by a pattern (label keys) have no structural form; the value
        # schema still applies, and the pydantic model checks the keys in the operator.
        (extra,) = node["patternProperties"].values()
    if "properties" in node:
        out.pop("additionalProperties", None)  # unknown fields are pruned, never allowed
        out["properties"] = {
            name: _convert(prop, definitions, f"{path}.{name}")
            for name, prop in node["properties"].items()
        }
        if "required" in node:
            out["required"] = list(node["required"])
    elif extra is True or extra is None or extra == {}:
        out.pop("additionalProperties", None)
        out["x-kubernetes-preserve-unknown-fields"] = True
    else:
        out["additionalProperties"] = _convert(extra, definitions, f"{path}.*")


def _int_or_string(node: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    """`int | str` as the API server's int-or-string (the shape of a resource quantity): both
    types allowed, a pattern checked on strings only."""
    options = [_resolve(o, definitions) for o in node.get("anyOf", [])]
    text = next((o for o in options if o.get("type") == "string"), {})
    out: dict[str, Any] = {"anyOf": [{"type": "integer"}, {"type": "string"}],
                           "x-kubernetes-int-or-string": True}
    if "pattern" in text:
        out["pattern"] = text["pattern"]
    if "description" in node:
        out["description"] = " ".join(node["description"].split())
    return out


def _collapse_any_of(node: dict[str, Any], definitions: dict[str, Any],
                     path: str) -> dict[str, Any]:
    """`X | None` becomes X (optional fields are simply left out); real unions are refused."""
    options = [_resolve(o, definitions) for o in node["anyOf"]]
    non_null = [o for o in options if o.get("type") != "null"]
    if len(non_null) != 1:
        raise SchemaError(f"{path}: unions of several types cannot be structural")
    merged = {**non_null[0], **{k: v for k, v in node.items() if k != "anyOf"}}
    if merged.get("default", 0) is None:
        del merged["default"]
    return merged


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value
