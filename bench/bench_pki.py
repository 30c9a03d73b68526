"""Certificates issued per second through TenantAuthority.issue, beside the raw cryptography rate.

The baseline is the same work done by hand with `cryptography`'s documented API: generate an
EC P-256 key, build a certificate with the same extensions (chained builder), sign it. Two more
reference rates: the same with the builder given every field at once, and that plus the output
kubiot must hand over (PKCS#8 key PEM, certificate PEM, SHA-256 fingerprint). kubiot encodes
device certificates from a per-CA template (the builder's bytes exactly; see
kubiot_operator/pki/template.py), which is how it can beat the raw rate while producing more.
Everything runs in one process, interleaved in rounds, so the machine's speed cancels out of
the ratios; time is the process's CPU time, so other work on the machine
does not count against either side.

    .venv/bin/python bench/bench_pki.py [--count N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from kubiot_contract.topics import IdentityKind
from kubiot_operator.pki import CertificateAuthority, MemoryMaterialStore, TenantAuthority

TENANT = "bench"
TARGET_RATIO = 0.80


@dataclass(frozen=True)
class BenchResult:
    count: int
    authority_per_second: float
    raw_per_second: float
    direct_build_per_second: float
    with_output_per_second: float

    @property
    def ratio(self) -> float:
        return self.authority_per_second / self.raw_per_second


def raw_issue(ca: CertificateAuthority, index: int) -> x509.Certificate:
    """Key generation, certificate building and signing, with nothing around them."""
    key = ec.generate_private_key(ec.SECP256R1())
    public_key = key.public_key()
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{TENANT}.d{index}")]))
        .issuer_name(ca.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                     False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
            f"kubiot://{TENANT}/devices/d{index}")]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(ca.authority_key_identifier, critical=False)
        .sign(ca.private_key, hashes.SHA256())
    )


def direct_build_issue(ca: CertificateAuthority, index: int) -> x509.Certificate:
    """The same certificate, with the builder given every field at once."""
    return _direct_build(ca, ec.generate_private_key(ec.SECP256R1()), index)


def _direct_build(ca: CertificateAuthority, key: ec.EllipticCurvePrivateKey,
                  index: int) -> x509.Certificate:
    public_key = key.public_key()
    now = datetime.now(UTC).replace(tzinfo=None)
    return x509.CertificateBuilder(
        issuer_name=ca.certificate.subject,
        subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{TENANT}.d{index}")]),
        public_key=public_key,
        serial_number=x509.random_serial_number(),
        not_valid_before=now - timedelta(minutes=5),
        not_valid_after=now + timedelta(days=365),
        extensions=[
            x509.Extension(ExtensionOID.BASIC_CONSTRAINTS, True,
                           x509.BasicConstraints(ca=False, path_length=None)),
            x509.Extension(ExtensionOID.KEY_USAGE, True, x509.KeyUsage(
                True, False, False, False, False, False, False, False, False)),
            x509.Extension(ExtensionOID.EXTENDED_KEY_USAGE, False,
                           x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])),
            x509.Extension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, False,
                           x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
                               f"kubiot://{TENANT}/devices/d{index}")])),
            x509.Extension(ExtensionOID.SUBJECT_KEY_IDENTIFIER, False,
                           x509.SubjectKeyIdentifier.from_public_key(public_key)),
            x509.Extension(ExtensionOID.AUTHORITY_KEY_IDENTIFIER, False,
                           ca.authority_key_identifier),
        ],
    ).sign(ca.private_key, hashes.SHA256())


def direct_build_with_output(ca: CertificateAuthority, index: int) -> tuple[bytes, bytes, str]:
    """The direct build plus what an issued certificate carries: key PEM, cert PEM, fingerprint."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _direct_build(ca, key, index)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return (key_pem, cert.public_bytes(serialization.Encoding.PEM),
            cert.fingerprint(hashes.SHA256()).hex())


def _timed(work: Callable[[CertificateAuthority, int], object], ca: CertificateAuthority,
           first: int, times: int) -> float:
    started = time.process_time()
    for index in range(first, first + times):
        work(ca, index)
    return time.process_time() - started


async def measure(count: int, rounds: int) -> BenchResult:
    authority = TenantAuthority(MemoryMaterialStore())
    ca = await authority.ensure_ca(TENANT)
    per_round = max(1, count // rounds)
    spent = {"authority": 0.0, "raw": 0.0, "direct": 0.0, "output": 0.0}
    for first in range(0, per_round * rounds, per_round):
        # Every certificate is for a distinct device, as in a real fleet.
        spent["raw"] += _timed(raw_issue, ca, first, per_round)
        started = time.process_time()
        for index in range(first, first + per_round):
            await authority.issue(TENANT, IdentityKind.DEVICE, f"d{index}", validity_days=365)
        spent["authority"] += time.process_time() - started
        spent["direct"] += _timed(direct_build_issue, ca, first, per_round)
        spent["output"] += _timed(direct_build_with_output, ca, first, per_round)
    total = per_round * rounds
    return BenchResult(total, total / spent["authority"], total / spent["raw"],
                       total / spent["direct"], total / spent["output"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=5000, help="certificates per side")
    parser.add_argument("--rounds", type=int, default=50,
                        help="alternations of the measured sides (more rounds even out load)")
    args = parser.parse_args(argv)
    result = asyncio.run(measure(args.count, args.rounds))
    print(f"certificates issued (EC P-256, generated key): {result.count} per side")
    print(f"TenantAuthority.issue           : {result.authority_per_second:9.1f} /s")
    print(f"raw keygen+build+sign (baseline): {result.raw_per_second:9.1f} /s")
    print(f"ratio                           : {result.ratio:9.1%} (target >= {TARGET_RATIO:.0%})")
    print("for reference, in the same run:")
    print(f"raw, builder given all fields   : {result.direct_build_per_second:9.1f} /s")
    print(f"  + key PEM, cert PEM, SHA-256  : {result.with_output_per_second:9.1f} /s")
    print(f"issue against the line above    : "
          f"{result.authority_per_second / result.with_output_per_second:9.1%}")
    return 0 if result.ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
