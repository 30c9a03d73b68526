"""A Mosquitto 2 broker run as a child process: mutual TLS for devices, dynamic security for rules.

Used by the local stack and by the tests. Two listeners: the device listener (mutual TLS, the
certificate's CN becomes the username, a CRL is enforced) and a loopback service listener where
the operator and ingest log in with a username and password kept by the dynamic-security plugin.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubiot_contract.topics import OPERATOR_USERNAME, tenant_root
from kubiot_operator.brokers import BrokerIdentity, PasswordCredential
from kubiot_operator.brokers import dynsec as commands
from kubiot_operator.brokers.base import MANAGED_MARKER
from kubiot_operator.local.ports import wait_for_port

DYNSEC_PLUGIN_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
)
DYNSEC_ITERATIONS = 101
ADMIN_ROLE = "kubiot-admin"


class MosquittoError(RuntimeError):
    """The broker could not be started or stopped."""


@dataclass(frozen=True)
class TLSListener:
    """The device listener: mutual TLS, identity from the client certificate."""

    port: int
    ca_file: Path
    cert_file: Path
    key_file: Path
    crl_file: Path | None = None
    require_certificate: bool = True
    use_identity_as_username: bool = True
    #: Bind each session to its certificate: the client id becomes the CN, whatever the client
    #: asked for, so no device can resume or displace another identity's session.
    use_username_as_clientid: bool = True


@dataclass(frozen=True)
class MosquittoConfig:
    data_dir: Path
    service_port: int
    admin_password: str
    admin_username: str = OPERATOR_USERNAME
    tls: TLSListener | None = None
    bind_address: str = "127.0.0.1"
    plugin_path: str = field(default_factory=lambda: find_dynsec_plugin())
    run_as_user: str = field(default_factory=getpass.getuser)
    #: Seconds between `$SYS` statistics updates; None keeps Mosquitto's default (10 s).
    sys_interval: int | None = None

    @property
    def dynsec_file(self) -> Path:
        return self.data_dir / "dynamic-security.json"

    @property
    def config_file(self) -> Path:
        return self.data_dir / "mosquitto.conf"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "mosquitto.log"


def find_dynsec_plugin() -> str:
    for candidate in DYNSEC_PLUGIN_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    raise MosquittoError(
        "the Mosquitto dynamic-security plugin was not found; install the 'mosquitto' package"
    )


def render_config(cfg: MosquittoConfig) -> str:
    """The mosquitto.conf for a config: pure, so tests can read what the broker is told."""
    lines = [
        "per_listener_settings false",
        "allow_anonymous false",
        # Started by root, Mosquitto would switch to the 'mosquitto' user and lose access to
        # the files it was given; keep the identity of whoever runs the stack.
        f"user {cfg.run_as_user}",
        f"plugin {cfg.plugin_path}",
        f"plugin_opt_config_file {cfg.dynsec_file}",
        "persistence true",
        f"persistence_location {cfg.data_dir}/",
        "autosave_interval 30",
        f"log_dest file {cfg.log_file}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        "max_queued_messages 100000",
        # Small control messages and acknowledgements must not wait on Nagle's algorithm.
        "set_tcp_nodelay true",
        *([f"sys_interval {cfg.sys_interval}"] if cfg.sys_interval is not None else []),
        "",
        f"listener {cfg.service_port} {cfg.bind_address}",
        "protocol mqtt",
    ]
    if cfg.tls is not None:
        tls = cfg.tls
        lines += [
            "",
            f"listener {tls.port} {cfg.bind_address}",
            "protocol mqtt",
            f"cafile {tls.ca_file}",
            f"certfile {tls.cert_file}",
            f"keyfile {tls.key_file}",
            f"require_certificate {'true' if tls.require_certificate else 'false'}",
            f"use_identity_as_username {'true' if tls.use_identity_as_username else 'false'}",
            f"use_username_as_clientid {'true' if tls.use_username_as_clientid else 'false'}",
            "tls_version tlsv1.2",
        ]
        if tls.crl_file is not None:
            lines.append(f"crlfile {tls.crl_file}")
    return "\n".join(lines) + "\n"


def dynsec_password(password: str, salt: bytes | None = None) -> dict[str, Any]:
    """The password fields of a dynamic-security client: PBKDF2-SHA512, as Mosquitto stores it."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, DYNSEC_ITERATIONS, 64)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": DYNSEC_ITERATIONS,
    }


def dynsec_bootstrap(admin_username: str, admin_password: str) -> dict[str, Any]:
    """The first dynamic-security state: one admin, and deny by default for everybody else."""
    allow_all = [
        {"acltype": acltype, "topic": topic, "priority": 0, "allow": True}
        for topic in ("$CONTROL/dynamic-security/#", "#")
        for acltype in ("publishClientSend", "publishClientReceive", "subscribePattern",
                        "unsubscribePattern")
    ]
    return {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": True,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": [{
            "username": admin_username,
            "textName": "kubiot operator",
            "roles": [{"rolename": ADMIN_ROLE}],
            **dynsec_password(admin_password),
        }],
        "groups": [],
        "roles": [{"rolename": ADMIN_ROLE, "textName": "kubiot operator", "acls": allow_all}],
    }


def dynsec_with_identities(state: dict[str, Any], identities: Iterable[BrokerIdentity]
                           ) -> dict[str, Any]:
    """The dynamic-security state with kubiot's identities in it, exactly as the broker
    backend's commands would leave it (so the backend later finds nothing to write).

    Mosquitto 2.0 rewrites its whole file after every write command, so creating N identities
    by command costs O(N^2); written here before the broker starts, it costs one file write.
    """
    seeded = {**state, "clients": list(state.get("clients", [])),
              "groups": list(state.get("groups", [])), "roles": list(state.get("roles", []))}
    groups: dict[str, dict[str, Any]] = {}
    for identity in identities:
        group = commands.tenant_group_name(identity.tenant)
        if group not in groups:
            groups[group] = {"groupname": group, "textname": MANAGED_MARKER,
                             "roles": [{"rolename": group}], "clients": []}
            seeded["roles"].append({
                "rolename": group, "textname": MANAGED_MARKER,
                "acls": [{"acltype": acl, "topic": f"{tenant_root(identity.tenant)}/#",
                          "priority": commands.TENANT_DENY_PRIORITY, "allow": False}
                         for acl in (commands.PUBLISH, commands.SUBSCRIBE)]})
        groups[group]["clients"].append({"username": identity.username})
        role = commands.role_name(identity.username)
        seeded["roles"].append({"rolename": role, "textname": MANAGED_MARKER,
                                "acls": commands.acls_for(identity.rules)})
        client: dict[str, Any] = {
            "username": identity.username, "textname": MANAGED_MARKER,
            "textdescription": commands.describe_client(identity),
            "roles": [{"rolename": role}] if identity.enabled else []}
        if not identity.enabled:
            client["disabled"] = True
        if isinstance(identity.credential, PasswordCredential):
            client.update(dynsec_password(identity.credential.password))
        seeded["clients"].append(client)
    seeded["groups"] += groups.values()
    return seeded


class MosquittoBroker:
    """One Mosquitto process. `start()` returns once both listeners accept connections."""

    def __init__(self, config: MosquittoConfig, executable: str | None = None) -> None:
        self.config = config
        self.executable = executable or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def prepare(self, identities: Iterable[BrokerIdentity] = ()) -> bool:
        """Write the config, and on a cold start the dynamic-security state with `identities`
        in it; False when the broker already has a state of its own (kept as it is)."""
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        cfg.config_file.write_text(render_config(cfg))
        if cfg.dynsec_file.exists():
            return False
        state = dynsec_with_identities(
            dynsec_bootstrap(cfg.admin_username, cfg.admin_password), identities)
        cfg.dynsec_file.write_text(json.dumps(state, indent=1))
        os.chmod(cfg.dynsec_file, 0o600)
        return True

    def start(self, timeout: float = 10.0, identities: Iterable[BrokerIdentity] = ()) -> None:
        """Start; a cold start (no dynamic-security state yet) begins with `identities`."""
        if self.running:
            return
        if not Path(self.executable).exists():
            raise MosquittoError(f"mosquitto not found at {self.executable}")
        self.prepare(identities)
        self._process = subprocess.Popen(
            [self.executable, "-c", str(self.config.config_file)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            for port in self._ports():
                wait_for_port(self.config.bind_address, port, timeout)
        except TimeoutError as exc:
            self.stop()
            raise MosquittoError(f"mosquitto did not start: {exc}\n{self.log_tail()}") from exc

    def _ports(self) -> list[int]:
        ports = [self.config.service_port]
        if self.config.tls is not None:
            ports.append(self.config.tls.port)
        return ports

    def stop(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop and start again: how the broker picks up a new CRL or certificate."""
        self.stop()
        self.start()

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads its configuration, certificates and CRL in place."""
        if self._process is None or self._process.poll() is not None:
            raise MosquittoError("mosquitto is not running")
        self._process.send_signal(signal.SIGHUP)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.config.log_file.read_text().splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
