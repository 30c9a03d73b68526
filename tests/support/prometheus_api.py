"""A few calls of Prometheus's HTTP API (v1), for tests that run a real server."""

from __future__ import annotations

from typing import Any

import aiohttp


class PrometheusApi:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    async def _get(self, path: str, **params: str) -> Any:
        timeout = aiohttp.ClientTimeout(total=10)
        async with (aiohttp.ClientSession(timeout=timeout) as session,
                    session.get(f"{self.url}{path}", params=params) as response):
            body = await response.json()
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('error', body)}")
        return body["data"]

    async def ready(self) -> bool:
        """Whether the server is up and has loaded its configuration."""
        try:
            async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
                        session.get(f"{self.url}/-/ready") as response):
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector (or scalar, as one sample) an expression gives now."""
        data = await self._get("/api/v1/query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    async def alerts(self) -> list[dict[str, Any]]:
        """Alerts pending or firing now (resolved ones are not listed)."""
        data = await self._get("/api/v1/alerts")
        alerts: list[dict[str, Any]] = data["alerts"]
        return alerts

    async def firing(self, name: str) -> list[dict[str, Any]]:
        return [a for a in await self.alerts()
                if a["labels"].get("alertname") == name and a["state"] == "firing"]

    async def active_names(self) -> set[str]:
        return {a["labels"]["alertname"] for a in await self.alerts()}

    async def targets_up(self) -> dict[str, bool]:
        """Each active target's job/pod and whether its last scrape worked."""
        data = await self._get("/api/v1/targets", state="active")
        return {f"{t['labels'].get('job')}/{t['labels'].get('pod')}": t["health"] == "up"
                for t in data["activeTargets"]}
