"""CRLs for brokers that fetch them (EMQX): certificates name where the operator serves the
tenant's CRL, and the real `openssl verify -crl_download` follows that to refuse a revoked one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from prometheus_client import CollectorRegistry

from kubiot_contract.topics import IdentityKind
from kubiot_operator.handlers.http import CRL_CONTENT_TYPE, crl_path, http_app
from kubiot_operator.local.ports import free_port
from kubiot_operator.pki import MemoryMaterialStore, TenantAuthority, crl_distribution_point
from tests.support.pki import openssl_verify

pytestmark = pytest.mark.timeout(60)


@dataclass
class CRLServer:
    authority: TenantAuthority
    store: MemoryMaterialStore
    base: str


@pytest.fixture
async def server() -> AsyncIterator[CRLServer]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    store = MemoryMaterialStore()
    authority = TenantAuthority(store, crl_url_template=base + crl_path("{tenant}"))
    runner = web.AppRunner(http_app(CollectorRegistry(), ready=lambda: True,
                                    authority=lambda: authority))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield CRLServer(authority, store, base)
    finally:
        await runner.cleanup()


def distribution_points(cert: x509.Certificate) -> list[str]:
    points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    return [name.value for point in points for name in point.full_name or ()]


async def test_openssl_downloads_the_crl_a_certificate_names_and_refuses_it_once_revoked(
        server: CRLServer) -> None:
    ca = await server.authority.ensure_ca("acme")
    issued = await server.authority.issue("acme", IdentityKind.DEVICE, "meter-1",
                                          validity_days=30)
    url = f"{server.base}/crl/acme.crl"
    assert distribution_points(issued.certificate) == [url]
    download = ["-crl_check", "-crl_download"]

    admitted = await asyncio.to_thread(openssl_verify, ca.cert_pem, issued.cert_pem,
                                       extra=download)
    assert admitted.returncode == 0, admitted.stderr + admitted.stdout

    await server.authority.revoke("acme", issued.serial, reason="keyCompromise")
    refused = await asyncio.to_thread(openssl_verify, ca.cert_pem, issued.cert_pem,
                                      extra=download)
    assert refused.returncode != 0
    assert "certificate revoked" in refused.stdout + refused.stderr


async def test_the_served_crl_is_der_and_names_where_it_is_published(server: CRLServer) -> None:
    await server.authority.ensure_ca("acme")
    async with aiohttp.ClientSession() as http, http.get(f"{server.base}/crl/acme.crl") as reply:
        assert reply.status == 200
        assert reply.content_type == CRL_CONTENT_TYPE
        crl = x509.load_der_x509_crl(await reply.read())
    assert crl_distribution_point(crl) == f"{server.base}/crl/acme.crl"
    extension = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint)
    assert extension.critical


async def test_an_unknown_tenant_gets_a_404_and_no_ca_is_made_for_it(server: CRLServer) -> None:
    async with aiohttp.ClientSession() as http:
        for path in ("/crl/ghost.crl", "/crl/Not_A_Name.crl"):
            async with http.get(server.base + path) as reply:
                assert reply.status == 404, path
    assert await server.store.get("tenant-ghost-ca") is None
    assert await server.store.get("tenant-ghost-crl") is None


async def test_without_a_crl_url_neither_certificates_nor_crls_name_one() -> None:
    authority = TenantAuthority(MemoryMaterialStore())
    issued = await authority.issue("acme", IdentityKind.DEVICE, "meter-1", validity_days=30)
    with pytest.raises(x509.ExtensionNotFound):
        issued.certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    assert crl_distribution_point(x509.load_pem_x509_crl(await authority.crl("acme"))) is None


async def test_a_crl_is_republished_when_the_url_changes() -> None:
    store = MemoryMaterialStore()
    before = TenantAuthority(store)
    await before.ensure_ca("acme")
    after = TenantAuthority(store, crl_url_template="http://crl.example/{tenant}.crl")
    crl = x509.load_pem_x509_crl(await after.crl("acme"))
    assert crl_distribution_point(crl) == "http://crl.example/acme.crl"


def test_a_template_without_the_tenant_is_refused() -> None:
    with pytest.raises(ValueError, match="tenant"):
        TenantAuthority(MemoryMaterialStore(), crl_url_template="http://crl.example/all.crl")
