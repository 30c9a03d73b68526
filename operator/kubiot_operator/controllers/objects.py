"""Small facts about Kubernetes objects the controllers share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from kubiot_operator.kube.client import NAMESPACES, TENANTS
from kubiot_operator.models import ResourceKind
from kubiot_operator.models.common import Condition, ConditionStatus
from kubiot_operator.models.tenant import TenantSpec
from kubiot_operator.reconcile.tenant import TENANT_LABEL

from .adapters import Objects

M = TypeVar("M", bound=BaseModel)


def owner_reference(body: dict[str, Any]) -> dict[str, Any]:
    """An ownerReference to `body`, so Kubernetes garbage-collects what it owns.

    Without `blockOwnerDeletion`: setting it needs `update` on the owner's `finalizers`
    subresource where OwnerReferencesPermissionEnforcement is on (OpenShift), and it matters
    only to foreground deletion, which kubiot's own teardown order makes unnecessary."""
    meta = body["metadata"]
    return {"apiVersion": body["apiVersion"], "kind": body["kind"], "name": meta["name"],
            "uid": meta["uid"], "controller": True}


def owned(obj: dict[str, Any], owner: dict[str, Any] | None) -> dict[str, Any]:
    if owner is not None:
        obj["metadata"]["ownerReferences"] = [owner]
    return obj


def generation(body: dict[str, Any]) -> int | None:
    value = body.get("metadata", {}).get("generation")
    return int(value) if value is not None else None


def parse_spec(model: type[M], body: dict[str, Any]) -> M:
    """The spec as a model; raises ValidationError for a spec the schema should have refused."""
    return model.model_validate(body.get("spec") or {})


def condition_held(conditions: list[Condition], kind: str, generation: int | None) -> bool:
    """Whether condition `kind` is True for this very generation of the object."""
    return any(c.type == kind and c.status is ConditionStatus.TRUE
               and c.observed_generation == generation for c in conditions)


def current_conditions(body: dict[str, Any]) -> list[Condition]:
    conditions = []
    for raw in (body.get("status") or {}).get("conditions") or []:
        try:
            conditions.append(Condition.model_validate(raw))
        except ValidationError:
            continue  # a hand-edited condition is replaced, not trusted
    return conditions


def validation_message(exc: ValidationError) -> str:
    """`spec.identity.csr: value is not ...; ...` — the fields a user must fix, in plain words."""
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in ("spec", *error["loc"]))
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


async def tenant_of_namespace(objects: Objects, namespace: str
                              ) -> tuple[str, TenantSpec] | None:
    """The tenant a namespace belongs to, from the namespace's label, with its spec."""
    ns = await objects.get(NAMESPACES, namespace)
    tenant = ((ns or {}).get("metadata", {}).get("labels") or {}).get(TENANT_LABEL)
    if not tenant:
        return None
    body = await objects.get(TENANTS, tenant)
    if body is None or body.get("metadata", {}).get("deletionTimestamp"):
        return None
    try:
        return tenant, parse_spec(TenantSpec, body)
    except ValidationError:
        return None


def conditions_wire(conditions: Sequence[Condition]) -> list[dict[str, Any]]:
    return [c.to_wire() for c in conditions]


class InvalidStatus(ValueError):
    """A controller produced a status its kind's model refuses: a bug, never written."""


def checked_status(resource: ResourceKind, status: dict[str, Any]) -> dict[str, Any]:
    """`status` if the kind's status model accepts every key and value in it, else
    InvalidStatus: a misspelt key would otherwise be dropped by the API server in silence."""
    try:
        resource.status.model_validate(status)
    except ValidationError as exc:
        raise InvalidStatus(f"{resource.kind} status refused by its model: {exc}") from exc
    return status
