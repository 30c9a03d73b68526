"""The operator's HTTP endpoints: metrics, probes, and the tenants' CRLs for brokers."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from kubiot_contract.topics import ContractError, validate_name
from kubiot_operator.pki import TenantAuthority

#: RFC 2585: a DER CRL fetched over HTTP.
CRL_CONTENT_TYPE = "application/pkix-crl"


def crl_path(tenant: str) -> str:
    """The path a tenant's CRL is served at (the settings' CRL URL template ends with it)."""
    return f"/crl/{tenant}.crl"


def http_app(registry: CollectorRegistry, *, ready: Callable[[], bool],
             authority: Callable[[], TenantAuthority | None],
             unhealthy: Callable[[], str | None] = lambda: None) -> web.Application:
    """/metrics, /healthz (unhealthy() says why a restart is needed), /readyz (ready() says
    whether the broker session is up) and /crl/<tenant>.crl (DER, as RFC 5280 asks of CRLs
    named by a distribution point)."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        problem = unhealthy()
        if problem is not None:
            return web.Response(status=503, text=f"{problem}\n")
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        if ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="broker session not up\n")

    async def crl(request: web.Request) -> web.Response:
        try:
            tenant = validate_name(request.match_info["tenant"], "tenant")
        except ContractError as exc:
            raise web.HTTPNotFound(text=f"{exc}\n") from exc
        current = authority()
        if current is None:
            raise web.HTTPServiceUnavailable(text="the operator is starting\n")
        pem = await current.published_crl(tenant)
        if pem is None:
            raise web.HTTPNotFound(text=f"tenant {tenant!r} has no CRL\n")
        der = x509.load_pem_x509_crl(pem).public_bytes(serialization.Encoding.DER)
        return web.Response(body=der, content_type=CRL_CONTENT_TYPE)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get(crl_path("{tenant}"), crl)
    return app
