"""How a simulated device's installs end: succeed, fail, fail for a fraction of devices, or hang.

Deterministic per device name, so a test knows in advance which devices fail.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum


class InstallResult(StrEnum):
    SUCCEED = "succeed"
    FAIL = "fail"
    HANG = "hang"  # stays installing forever: the release's progress deadline times it out


@dataclass(frozen=True)
class Scenario:
    """`result` for every device, except `fail_fraction` of them (by name) fail.

    With `versions`, only installs of those versions go wrong; others succeed (so a fleet can
    reject a bad release yet take the rollback to a good one).
    """

    result: InstallResult = InstallResult.SUCCEED
    fail_fraction: float = 0.0
    seed: str = ""
    step_seconds: float = 0.05  # time spent downloading and installing
    versions: frozenset[str] = frozenset()

    @classmethod
    def succeed(cls, step_seconds: float = 0.05) -> Scenario:
        return cls(InstallResult.SUCCEED, step_seconds=step_seconds)

    @classmethod
    def fail(cls, step_seconds: float = 0.05) -> Scenario:
        return cls(InstallResult.FAIL, step_seconds=step_seconds)

    @classmethod
    def hang(cls) -> Scenario:
        return cls(InstallResult.HANG)

    @classmethod
    def failing_fraction(cls, fraction: float, seed: str = "", step_seconds: float = 0.05,
                         versions: frozenset[str] = frozenset()) -> Scenario:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError("the failing fraction is between 0 and 1")
        return cls(InstallResult.SUCCEED, fail_fraction=fraction, seed=seed,
                   step_seconds=step_seconds, versions=versions)

    def result_for(self, device: str, version: str | None = None) -> InstallResult:
        """How `device`'s install of `version` ends."""
        if self.versions and version not in self.versions:
            return InstallResult.SUCCEED
        if self.fail_fraction and _unit_interval(f"{self.seed}/{device}") < self.fail_fraction:
            return InstallResult.FAIL
        return self.result


def _unit_interval(text: str) -> float:
    """A stable value in [0, 1) for `text`."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64
