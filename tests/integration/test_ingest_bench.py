"""A few seconds of bench/bench_ingest.py: it runs end to end and prints every figure."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.support.ingest import REPO


def test_the_ingest_benchmark_runs_and_reports_its_figures() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_ingest.py"), "--seconds", "2",
         "--messages", "3000"],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout

    def figure(label: str) -> float:
        match = re.search(rf"{re.escape(label)}\s+([\d.]+)", out)
        assert match, f"{label!r} missing from:\n{out}"
        return float(match.group(1))

    ingest = figure("kubiot-ingest (committed + acked)")
    baseline = figure("baseline (INSERT per message)")
    assert figure("broker ceiling (mosquitto_sub)") > 0
    # The broker and the ingest are measured in turns, twice each.
    assert re.findall(r"round (\d): broker ceiling.*\n.*round \1: kubiot-ingest", out) == \
        ["1", "2"], out
    assert ingest > baseline > 0
    assert figure("ingest peak RSS") > 0
    assert re.search(r"p50 \d+ ms, p99 \d+ ms \((\d+) of \1 messages stored\)", out), out
    assert figure("database ceiling (sink, no MQTT)") > 0
    assert figure("raw COPY into the same table") > 0
    for stage in ("MQTT receive + decode + ack", "validation", "row building", "database writes"):
        assert re.search(rf"{re.escape(stage)}.*\s[\d.]+ us\s+\d+%", out), out
    assert re.search(r"ingest / broker ceiling\s+\d+%", out), out
    assert re.search(r"ingest / database ceiling\s+\d+%", out), out
    assert re.search(r"sink / raw COPY\s+\d+%", out), out
    assert re.search(r"ingest / baseline\s+[\d.]+x", out), out
    assert figure("the detector alone") > 0
    assert re.search(r"detector / ingest CPU per message\s+[\d.]+% \(target < 10%", out), out
