"""promtool checks the alert rules and runs their unit tests (charts/kubiot/files)."""

from __future__ import annotations

from tests.support.tools import REPO_ROOT, require_tool, run_tool

RULES_DIR = REPO_ROOT / "charts/kubiot/files"


def test_promtool_accepts_the_rules() -> None:
    result = run_tool(require_tool("promtool"), "check", "rules", "alerts.yaml", cwd=RULES_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = run_tool(require_tool("promtool"), "test", "rules", "alerts.test.yaml",
                      cwd=RULES_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
