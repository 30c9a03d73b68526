"""Where a kind lives in the Kubernetes API: group, version, plural, scope, and its paths."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote


@dataclass(frozen=True)
class KubeKind:
    """Where a kind lives in the API."""

    group: str
    version: str
    plural: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced:
            if namespace is None and name is not None:
                raise ValueError(f"{self.plural} are namespaced: a namespace is required")
            if namespace is not None:
                base += f"/namespaces/{quote(namespace)}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{quote(name)}"
        if subresource is not None:
            base += f"/{subresource}"
        return base
