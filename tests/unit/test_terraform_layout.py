"""terraform/: pinned versions, documented and validated variables, outputs the chart uses.

`terraform validate` needs provider downloads, so these checks read the HCL as text; formatting
is checked by the real binary in tests/integration/test_terraform_fmt.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.support.tools import REPO_ROOT

TERRAFORM = REPO_ROOT / "terraform"
SOURCE = "\n".join(p.read_text() for p in sorted(TERRAFORM.glob("*.tf")))
# Variables a type constraint already fully validates.
NEEDS_NO_VALIDATION = {"bool", "map(string)"}


def _blocks(kind: str) -> Iterator[tuple[str, str]]:
    """(name, body) of every top-level `kind "name" {...}` block, matching braces."""
    for match in re.finditer(rf'^{kind} "([^"]+)" \{{', SOURCE, re.MULTILINE):
        depth, index = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(SOURCE[index], 0)
            index += 1
        yield match.group(1), SOURCE[match.end():index - 1]


VARIABLES = dict(_blocks("variable"))
OUTPUTS = dict(_blocks("output"))


def _attribute(body: str, name: str) -> str | None:
    found = re.search(rf"^\s*{name}\s*=\s*(.+)$", body, re.MULTILINE)
    return found.group(1).strip() if found else None


def test_terraform_and_provider_versions_are_pinned() -> None:
    assert re.search(r'required_version\s*=\s*">= 1\.\d+\.\d+, < 2\.0\.0"', SOURCE)
    providers = re.findall(r'source\s*=\s*"hashicorp/(\w+)"\s*\n\s*version\s*=\s*"([^"]+)"',
                           SOURCE)
    assert providers, "no provider pinned"
    for name, version in providers:
        assert re.fullmatch(r"~> \d+\.\d+", version), f"{name}: {version}"


def test_modules_are_pinned_to_exact_versions() -> None:
    modules = dict(_blocks("module"))
    assert {"vpc", "eks"} <= set(modules)
    for name, body in modules.items():
        version = _attribute(body, "version")
        assert version and re.fullmatch(r'"\d+\.\d+\.\d+"', version), f"module {name}: {version}"


@pytest.mark.parametrize("name", sorted(VARIABLES))
def test_variable_is_described_typed_and_validated(name: str) -> None:
    body = VARIABLES[name]
    description = _attribute(body, "description")
    assert description and len(description) > 10, f"{name} has no useful description"
    variable_type = _attribute(body, "type")
    assert variable_type, f"{name} has no type"
    if variable_type not in NEEDS_NO_VALIDATION:
        assert "validation {" in body, f"{name} has no validation"
        assert "error_message" in body


def test_every_variable_is_used() -> None:
    for name in VARIABLES:
        assert f"var.{name}" in SOURCE, f"variable {name} is never used"


def test_outputs_give_what_the_chart_and_skaffold_need() -> None:
    assert {"cluster_name", "kubeconfig_command", "ecr_registry", "ecr_repository_urls",
            "operator_role_arn", "database_endpoint", "database_secret_arn",
            "helm_values"} <= set(OUTPUTS)
    for name, body in OUTPUTS.items():
        assert _attribute(body, "description"), f"output {name} has no description"
    helm_values = OUTPUTS["helm_values"]
    for chart_value in ("operator", "ingest", "serviceAccount", "eks.amazonaws.com/role-arn"):
        assert chart_value in helm_values


def test_database_password_lives_in_secrets_manager_not_in_the_state() -> None:
    assert re.search(r"^\s*manage_master_user_password\s*=\s*true$", SOURCE, re.MULTILINE)
    assert not re.search(r"^\s*password\s*=", SOURCE, re.MULTILINE)
    assert re.search(r"^\s*storage_encrypted\s*=\s*true$", SOURCE, re.MULTILINE)


def test_example_tfvars_sets_only_declared_variables() -> None:
    example = (TERRAFORM / "terraform.tfvars.example").read_text()
    assigned = set(re.findall(r"^(\w+)\s*=", example, re.MULTILINE))
    assert assigned and assigned <= set(VARIABLES), sorted(assigned - set(VARIABLES))
