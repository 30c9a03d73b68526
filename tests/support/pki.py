"""PKI test support: the real `openssl` binary as an independent verifier, and CSR makers."""

from __future__ import annotations

import base64
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from paho.mqtt.client import ConnectFlags, DisconnectFlags
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.support.waiting import wait_until

CSRKey = (ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
          | dsa.DSAPrivateKey)


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the openssl binary; the caller asserts on returncode and output."""
    return subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30,
                          check=False)


def openssl_verify(ca_pem: bytes, cert_pem: bytes, *, crl_pem: bytes | None = None,
                   purpose: str = "sslclient", strict: bool = True,
                   extra: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """`openssl verify -CAfile <ca> [-x509_strict] [-crl_check -CRLfile <crl>] <cert>`."""
    with tempfile.TemporaryDirectory(prefix="kubiot-openssl-") as tmp:
        folder = Path(tmp)
        ca_file, cert_file = folder / "ca.pem", folder / "cert.pem"
        ca_file.write_bytes(ca_pem)
        cert_file.write_bytes(cert_pem)
        args = ["verify", "-CAfile", str(ca_file), "-purpose", purpose, *extra]
        if strict:
            args.append("-x509_strict")
        if crl_pem is not None:
            crl_file = folder / "crl.pem"
            crl_file.write_bytes(crl_pem)
            args += ["-crl_check", "-CRLfile", str(crl_file)]
        return openssl(*args, str(cert_file))


def openssl_text(kind: str, pem: bytes) -> str:
    """`openssl <x509|crl|req> -noout -text` of a PEM object."""
    with tempfile.NamedTemporaryFile(suffix=".pem") as handle:
        handle.write(pem)
        handle.flush()
        result = openssl(kind, "-in", handle.name, "-noout", "-text")
    assert result.returncode == 0, result.stderr
    return result.stdout


def make_csr(key: CSRKey, common_name: str) -> bytes:
    """A PEM CSR signed by `key`, as a device would make it."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def tamper_signature(csr_pem: bytes) -> bytes:
    """The same CSR with one bit of its signature flipped: still parses, no longer verifies."""
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    csr = x509.load_der_x509_csr(bytes(der))
    return csr.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class ConnectOutcome:
    """What a TLS MQTT client saw: a CONNACK reason code, or the error that ended the attempt."""

    reason_code: int | None
    error: str | None = None

    @property
    def accepted(self) -> bool:
        return self.reason_code == 0


def resign_csr(csr_pem: bytes, key: ec.EllipticCurvePrivateKey,
               edit: Callable[[bytes], bytes]) -> bytes:
    """The CSR with its request info (DER) edited by `edit` and signed again by `key`: a CSR
    whose maker holds the key but wrote bytes no CSR builder would (ECDSA with SHA-256 only)."""
    csr = x509.load_pem_x509_csr(csr_pem)
    info = edit(csr.tbs_certrequest_bytes)
    ecdsa_with_sha256 = _der(0x30, _der(0x06, bytes.fromhex("2a8648ce3d040302")))
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    der = _der(0x30, info + ecdsa_with_sha256 + _der(0x03, b"\x00" + signature))
    return (b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(der)
            + b"-----END CERTIFICATE REQUEST-----\n")


def _der(tag: int, body: bytes) -> bytes:
    size = len(body)
    if size < 0x80:
        return bytes([tag, size]) + body
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + body


def mqtt_tls_connect(port: int, *, server_ca: Path, cert_file: Path, key_file: Path,
                     client_id: str, host: str = "127.0.0.1",
                     timeout: float = 10.0) -> ConnectOutcome:
    """Connect a real MQTT v5 client with a client certificate and report the outcome."""
    seen: dict[str, int] = {}

    def on_connect(_client: mqtt.Client, _userdata: Any, _flags: ConnectFlags, code: ReasonCode,
                   _properties: Properties | None) -> None:
        seen.setdefault("connack", code.value)

    def on_disconnect(_client: mqtt.Client, _userdata: Any, _flags: DisconnectFlags,
                      code: ReasonCode, _properties: Properties | None) -> None:
        seen.setdefault("gone", code.value)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=str(server_ca), certfile=str(cert_file), keyfile=str(key_file))
    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    try:
        client.connect(host, port, keepalive=10)
    except (ssl.SSLError, OSError) as exc:
        return ConnectOutcome(None, f"{type(exc).__name__}: {exc}")
    client.loop_start()
    try:
        wait_until(lambda: seen, timeout=timeout, message="CONNACK or disconnect")
    finally:
        client.disconnect()
        client.loop_stop()
    if "connack" in seen:
        return ConnectOutcome(seen["connack"])
    # The MQTT client only says the connection dropped; a bare handshake tells why.
    alert = tls_handshake_error(port, server_ca=server_ca, cert_file=cert_file,
                                key_file=key_file, host=host, timeout=timeout)
    return ConnectOutcome(None, f"disconnected before CONNACK (reason {seen['gone']}): {alert}")


def tls_handshake_error(port: int, *, server_ca: Path, cert_file: Path, key_file: Path,
                        host: str = "127.0.0.1", timeout: float = 10.0) -> str | None:
    """The TLS alert a server answers a client certificate with, or None when it accepts it."""
    context = ssl.create_default_context(cafile=str(server_ca))
    context.load_cert_chain(str(cert_file), str(key_file))
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=host) as tls:
            # Under TLS 1.3 the server judges the client certificate after the handshake, so
            # read once: a refusal arrives as an alert, an acceptance as silence (timeout).
            tls.settimeout(0.5)
            try:
                tls.recv(1)
            except TimeoutError:
                return None
            return "connection closed without an alert"
    except ssl.SSLError as exc:
        return exc.reason or str(exc)
