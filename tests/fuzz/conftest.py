"""Hypothesis profiles of the fuzz suite: `ci` (the default, bounded for every test run) and
`long` (`make fuzz`, about ten minutes). Chosen with HYPOTHESIS_PROFILE."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Time per message is asserted by the properties themselves (a wall-clock deadline per example
# flakes on a shared machine), and hostile inputs are large and slow to generate by design.
_COMMON = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much, HealthCheck.large_base_example],
    print_blob=True,
)
settings.register_profile("ci", _COMMON, max_examples=int(os.environ.get("FUZZ_EXAMPLES", 150)))
# About ten minutes on two shared cores: twelve times the examples of `ci`.
settings.register_profile("long", _COMMON,
                          max_examples=int(os.environ.get("FUZZ_EXAMPLES", 1_800)))
