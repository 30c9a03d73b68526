"""A small run of bench/bench_provisioning.py, so the benchmark keeps working."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_provisioning.py"


def test_bench_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_provisioning", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up by name
    spec.loader.exec_module(bench)

    assert bench.main(["--count", "4", "--claims", "2"]) == 0

    out = capsys.readouterr().out
    assert "all at once, a claim each" in out
    assert "all at once, one claim" in out
    assert "all at once, 2 claims" in out
