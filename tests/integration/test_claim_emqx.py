"""A provisioning claim on the EMQX backend (against the HTTP fake of EMQX's REST API): its
rules are its claim's provisioning topics, read back as a claim, and left alone by a resync."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from kubiot_contract.topics import IdentityKind, claim_access, claim_username
from kubiot_operator.brokers import BrokerIdentity, CertificateCredential
from kubiot_operator.brokers.emqx import EmqxBackend
from tests.support.emqx_fake import EmqxFake


@pytest.fixture
async def emqx(emqx_fake: EmqxFake) -> AsyncIterator[EmqxBackend]:
    async with EmqxBackend(emqx_fake.url, emqx_fake.api_key, emqx_fake.api_secret) as backend:
        yield backend


def claim(revoked: bool = False) -> BrokerIdentity:
    return BrokerIdentity(claim_username("acme", "line-1"), "acme", IdentityKind.CLAIM,
                          claim_access("acme", "line-1"), CertificateCredential(),
                          enabled=not revoked)


async def test_a_claim_is_written_read_back_and_left_alone_by_a_resync(
        emqx: EmqxBackend) -> None:
    await emqx.ensure_tenant("acme")
    await emqx.ensure_identity(claim())
    (found,) = [i for i in await emqx.list_identities("acme")
                if i.username == "acme.claim.line-1"]
    assert found.kind is IdentityKind.CLAIM
    assert found.rules == claim_access("acme", "line-1")
    assert (await emqx.resync("acme", [claim()])).writes == 0


async def test_removing_a_claim_removes_its_rules(emqx: EmqxBackend) -> None:
    await emqx.ensure_tenant("acme")
    await emqx.ensure_identity(claim())
    await emqx.remove_identity(claim_username("acme", "line-1"))
    assert all(i.username != "acme.claim.line-1" for i in await emqx.list_identities("acme"))
