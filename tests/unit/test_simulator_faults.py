"""The simulator's health faults: written as an annotation, shown by firmware version."""

from __future__ import annotations

import pytest

from kubiot_operator.simulator import Faults, HealthFault, parse_faults


def test_faults_by_version_and_for_every_version() -> None:
    faults = parse_faults(" silent@2.0.0, anomalous@2.1.0 ,offline")
    assert faults.active("2.0.0") is HealthFault.SILENT
    assert faults.active("2.1.0") is HealthFault.ANOMALOUS
    assert faults.active("1.0.0") is HealthFault.OFFLINE
    assert str(faults) == "silent@2.0.0,anomalous@2.1.0,offline"
    assert parse_faults("anomalous@3.0.0").active("1.0.0") is None
    assert parse_faults("") == Faults() and Faults().active("2.0.0") is None


@pytest.mark.parametrize(("text", "why"), [
    ("sleepy@2.0.0", "unknown fault 'sleepy' (one of silent, anomalous, offline)"),
    ("silent@", "names no version"),
])
def test_a_bad_annotation_is_refused_with_a_reason(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why.replace("(", r"\(").replace(")", r"\)")):
        parse_faults(text)
