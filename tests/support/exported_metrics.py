"""The Prometheus series names kubiot exports, read from the metric classes themselves.

Alerts and dashboards may only query these; the names come from instantiating the classes into a
fresh registry, so a renamed metric breaks the tests instead of a dashboard.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from prometheus_client import CollectorRegistry

from kubiot_ingest.metrics import IngestMetrics
from kubiot_operator.brokers.statistics import BrokerStatistics
from kubiot_operator.metrics import OperatorMetrics

# Series a family of each type exposes, besides `_created` (which dashboards should not use).
_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
}

# A metric name in PromQL: our names all start with `kubiot_`.
_KUBIOT_NAME = re.compile(r"\bkubiot_[a-zA-Z0-9_:]*")


def series_names(registry: CollectorRegistry) -> set[str]:
    """Every series name the registry's families expose, with or without samples yet."""
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


def exported_series() -> set[str]:
    """Series names of the operator (with the broker statistics it exports) and the ingest."""
    operator = CollectorRegistry()
    OperatorMetrics(operator)
    BrokerStatistics(operator)
    ingest = CollectorRegistry()
    IngestMetrics(ingest, "probe")
    return series_names(operator) | series_names(ingest)


def metric_names_in(expressions: Iterable[str]) -> set[str]:
    """The kubiot metric names a set of PromQL expressions refer to."""
    return {name for expression in expressions for name in _KUBIOT_NAME.findall(expression)}
