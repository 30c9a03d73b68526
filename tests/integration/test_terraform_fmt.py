"""terraform/ is formatted the way `terraform fmt` writes it."""

from __future__ import annotations

from tests.support.tools import REPO_ROOT, require_tool, run_tool


def test_terraform_fmt_check_passes() -> None:
    # Terraform is optional on a test machine: without one (none on PATH and none installable
    # by `make tools`) the check is skipped with the reason.
    terraform = require_tool("terraform", optional=True)
    result = run_tool(terraform, "fmt", "-check", "-recursive", "-diff", REPO_ROOT / "terraform")
    assert result.returncode == 0, f"run `terraform fmt -recursive terraform/`:\n{result.stdout}"
