"""The `kubiot` command line: offline validation for GitOps pipelines, CRDs, access rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kubiot_operator.cli import main
from kubiot_operator.models.device import DeviceSpec

ROOT = Path(__file__).resolve().parents[2]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


def test_validate_accepts_the_examples(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "validate", str(ROOT / "manifests" / "examples"))
    assert code == 0
    assert "10 kubiot resources checked, 0 invalid" in out


def test_validate_names_the_file_and_field(capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "apiVersion": "kubiot.io/v1alpha1", "kind": "Device",
        "metadata": {"name": "d1", "namespace": "acme"},
        "spec": {"identity": {"type": "CSR"}},
    }))
    code, out, err = run(capsys, "validate", str(bad))
    assert code == 1
    assert "1 invalid" in out
    assert f"{bad}: Device d1 is invalid: spec.identity.csr" in err


def test_crds_prints_every_crd(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "crds")
    assert code == 0
    names = [d["metadata"]["name"] for d in yaml.safe_load_all(out)]
    assert names == ["tenants.kubiot.io", "devices.kubiot.io", "gateways.kubiot.io",
                     "firmwarereleases.kubiot.io", "devicecommands.kubiot.io"]


def test_rules_for_a_gateway(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "rules", "--tenant", "acme", "--gateway", "edge",
                       "--children", "m1")
    assert code == 0
    assert "username: acme.gw.edge" in out
    assert "  acme/devices/m1/telemetry\n" in out
    code, _, err = run(capsys, "rules", "--tenant", "acme", "--device", "Bad.Name")
    assert code == 2
    assert "DNS label" in err


def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    """`kubiot local tail | head`: no BrokenPipeError traceback, SIGPIPE's exit status."""
    import subprocess
    import sys

    writer = ("import sys; from kubiot_operator.cli import run_to_a_pipe\n"
              "def flood():\n"
              "    for i in range(1_000_000):\n"
              "        print('acme/devices/pump-1/telemetry', i)\n"
              "sys.exit(run_to_a_pipe(flood))\n")
    done = subprocess.run(["bash", "-c", f'"{sys.executable}" -c "$0" | head -n 2; '
                           'exit "${PIPESTATUS[0]}"', writer],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.stdout.splitlines() == ["acme/devices/pump-1/telemetry 0",
                                        "acme/devices/pump-1/telemetry 1"]
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr
    assert done.returncode == 141


@pytest.mark.parametrize(("kind", "name", "accepted"), [
    ("Tenant", "7eleven", False),                  # its `7eleven-ingest` Service is refused
    ("Tenant", "a" * 57, False),                   # `<57 chars>-ingest` exceeds 63
    ("Tenant", "a" * 56, True),
    ("Tenant", "seven-eleven", True),
    ("FirmwareRelease", "pump-fw-2.1.0", True),    # a DNS subdomain may have dots
    ("FirmwareRelease", "pump_fw", False),
    ("FirmwareRelease", "Pump-FW", False),
    ("Device", "7-sensor", True),                  # a Device derives no Service
])
def test_validate_refuses_names_the_api_server_would_refuse_for_derived_objects(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, kind: str, name: str,
        accepted: bool) -> None:
    specs = {"Tenant": {}, "Device": {},
             "FirmwareRelease": {"version": "2.1.0", "selector": {"model": "ps-10"},
                                 "artifact": {"url": "https://fw.example.com/p.bin",
                                              "sha256": "ab" * 32, "size": 1024}}}
    manifest = tmp_path / "named.yaml"
    manifest.write_text(yaml.safe_dump({
        "apiVersion": "kubiot.io/v1alpha1", "kind": kind,
        "metadata": {"name": name, "namespace": "acme"}, "spec": specs[kind]}))

    code, _, err = run(capsys, "validate", str(manifest))

    assert (code == 0) is accepted, err
    if not accepted:
        assert "metadata.name" in err


@pytest.mark.parametrize(("spec", "accepted"), [
    ({"ingest": {"resources": {"limits": {"cpu": 1, "memory": "512Mi"}}}}, True),
    ({"ingest": {"resources": {"requests": {"cpu": "500m"}}}}, True),
    ({"ingest": {"resources": {"requests": {"cpu": "half a core"}}}}, False),
])
def test_resource_quantities_are_integers_or_strings_as_in_a_pod(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, spec: dict[str, object],
        accepted: bool) -> None:
    manifest = tmp_path / "tenant.yaml"
    manifest.write_text(yaml.safe_dump({"apiVersion": "kubiot.io/v1alpha1", "kind": "Tenant",
                                        "metadata": {"name": "acme"}, "spec": spec}))

    code, _, err = run(capsys, "validate", str(manifest))

    assert (code == 0) is accepted, err


def test_desired_state_is_bounded(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    manifest = tmp_path / "device.yaml"
    manifest.write_text(yaml.safe_dump({
        "apiVersion": "kubiot.io/v1alpha1", "kind": "Device",
        "metadata": {"name": "d1", "namespace": "acme"},
        "spec": {"desired": {f"setting{i}": i for i in range(65)}}}))

    code, _, err = run(capsys, "validate", str(manifest))

    assert code == 1 and "spec.desired" in err
    with pytest.raises(ValidationError, match="16 KiB"):
        DeviceSpec.model_validate({"desired": {"blob": "x" * 17 * 1024}})
