"""A Prometheus server run as a child process: the local stack's monitoring, with the chart's rules.

It scrapes the operator core (which also exports the broker's `$SYS` statistics) and every ingest
process, and evaluates `charts/kubiot/files/alerts.yaml`, the file the chart's PrometheusRule is
rendered from. Targets carry the labels a Kubernetes scrape through the chart's and the operator's
ServiceMonitors would give them (`job`, `namespace`, `pod`, `service`), so the same expressions
and annotations work unchanged.

Targets are written to a file Prometheus watches (file-based service discovery): an ingest
process started later is scraped within a second, without a reload.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .ingest import die_with_parent
from .ports import wait_for_port

log = logging.getLogger("kubiot.local")
#: The alert rules the chart ships, found beside the package in a checkout.
CHART_RULES = Path(__file__).resolve().parents[3] / "charts/kubiot/files/alerts.yaml"
EXECUTABLE_CANDIDATES = ("/usr/bin/prometheus", "/usr/local/bin/prometheus")
_DURATION = re.compile(r"(\d+)(ms|y|w|d|h|m|s)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800,
                 "y": 31536000}


class PrometheusError(RuntimeError):
    """The server could not be started."""


@dataclass(frozen=True)
class ScrapeTarget:
    """One endpoint to scrape and the target labels it gets."""

    address: str  # host:port
    labels: dict[str, str] = field(default_factory=dict)


def parse_duration(text: str) -> float:
    """Seconds in a Prometheus duration such as `90s`, `10m` or `1h30m`."""
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def format_duration(seconds: float) -> str:
    """A Prometheus duration: whole seconds as `90s`, anything finer in milliseconds."""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


def local_alert_rules(rules: dict[str, Any], *, longest_for: float | None) -> dict[str, Any]:
    """The chart's rules with every alert's `for:` cut to at most `longest_for` seconds (None
    keeps them): on a development machine an alert should show within seconds of its cause.

    Expressions, thresholds, labels and annotations are the chart's, untouched."""
    groups = []
    for group in rules["groups"]:
        shortened = []
        for rule in group["rules"]:
            rule = dict(rule)
            if (longest_for is not None and "alert" in rule and "for" in rule
                    and parse_duration(str(rule["for"])) > longest_for):
                rule["for"] = format_duration(longest_for)
            shortened.append(rule)
        groups.append({**group, "rules": shortened})
    return {**rules, "groups": groups}


def server_config(*, interval: float, targets_file: Path, rules_file: Path | None
                  ) -> dict[str, Any]:
    """prometheus.yml: one scrape job over the targets file, the rules evaluated as often."""
    every = format_duration(interval)
    return {
        "global": {"scrape_interval": every, "evaluation_interval": every,
                   # Below the interval, so a hung process shows as a failed scrape (up == 0)
                   # before the next one is due.
                   "scrape_timeout": format_duration(max(interval * 0.75, 0.5))},
        "rule_files": [str(rules_file)] if rules_file is not None else [],
        "scrape_configs": [{
            "job_name": "kubiot-local",  # every target sets its own `job` label
            "file_sd_configs": [{"files": [str(targets_file)]}],
        }],
    }


def target_groups(targets: Iterable[ScrapeTarget]) -> list[dict[str, Any]]:
    """The targets in file-based service discovery's format, one group per target."""
    return [{"targets": [t.address], "labels": dict(sorted(t.labels.items()))}
            for t in sorted(targets, key=lambda t: t.address)]


def find_executable() -> str:
    found = shutil.which("prometheus")
    if found:
        return found
    for candidate in EXECUTABLE_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    raise PrometheusError("prometheus was not found; install the 'prometheus' package")


class PrometheusServer:
    """One Prometheus process keeping its data in `root/data`. `start()` returns once it is
    ready; `set_targets()` changes what it scrapes while it runs."""

    def __init__(self, root: Path, port: int, *, interval: float = 2.0,
                 rules: dict[str, Any] | None = None, host: str = "127.0.0.1",
                 executable: str | None = None) -> None:
        self.root = root
        self.port = port
        self.host = host
        self.interval = interval
        self.rules = rules
        self.executable = executable or find_executable()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def targets_file(self) -> Path:
        return self.root / "targets.json"

    @property
    def rules_file(self) -> Path:
        return self.root / "alerts.yaml"

    @property
    def log_file(self) -> Path:
        return self.root / "prometheus.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def set_targets(self, targets: Iterable[ScrapeTarget]) -> None:
        """Write the targets file; Prometheus notices the change by itself."""
        text = json.dumps(target_groups(targets), indent=2)
        self.root.mkdir(parents=True, exist_ok=True)
        if self.targets_file.exists() and self.targets_file.read_text() == text:
            return
        temporary = self.targets_file.with_suffix(".tmp")
        temporary.write_text(text)
        temporary.replace(self.targets_file)

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.targets_file.exists():
            self.set_targets([])
        if self.rules is not None:
            self.rules_file.write_text(yaml.safe_dump(self.rules, sort_keys=False))
        config = self.root / "prometheus.yml"
        config.write_text(yaml.safe_dump(server_config(
            interval=self.interval, targets_file=self.targets_file,
            rules_file=self.rules_file if self.rules is not None else None), sort_keys=False))
        with self.log_file.open("ab") as output:
            self._process = subprocess.Popen(
                [self.executable, f"--config.file={config}",
                 f"--storage.tsdb.path={self.root / 'data'}",
                 f"--web.listen-address={self.host}:{self.port}",
                 "--storage.tsdb.retention.time=7d"],
                stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.root, preexec_fn=die_with_parent)
        try:
            wait_for_port(self.host, self.port, timeout)
            self._wait_ready(timeout)
        except (TimeoutError, PrometheusError) as exc:
            self.stop()
            raise PrometheusError(f"prometheus did not start: {exc}\n{self.log_tail()}") from exc

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise PrometheusError("prometheus exited")
            with (contextlib.suppress(urllib.error.URLError, OSError),
                  urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response):
                if response.status == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout:.0f}s")
            time.sleep(0.2)

    def stop(self, timeout: float = 20.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("prometheus did not stop in %.0f s; killing it", timeout)
            process.kill()
            process.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def load_rules(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return loaded
