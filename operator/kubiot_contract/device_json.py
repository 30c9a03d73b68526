"""JSON documents a device sends (reported state, firmware progress, command results), read with
explicit bounds.

Python's `json` recurses once per nesting level (a deep enough document raises RecursionError),
turns `1e400` into infinity, and keeps lone surrogates that no UTF-8 encoder, PostgreSQL `jsonb`
or Kubernetes API accepts. A document read here is at most `max_bytes` long and `max_depth`
deep, holds only finite numbers and text any of them can store; anything else is refused with a
TelemetryRejected, never another exception.
"""

from __future__ import annotations

import math
from typing import Any

import pydantic_core

from kubiot_contract.telemetry import RejectReason, TelemetryRejected

#: Deeper than any real device twin; a document is walked at most this deep.
MAX_DOCUMENT_DEPTH = 32
MAX_DOCUMENT_BYTES = 256 * 1024


def parse_device_json(raw: bytes, *, max_bytes: int = MAX_DOCUMENT_BYTES,
                      max_depth: int = MAX_DOCUMENT_DEPTH) -> Any:
    """The JSON value of `raw`, or TelemetryRejected (`bad_json`, `bad_schema`, `too_large`)."""
    if len(raw) > max_bytes:
        raise TelemetryRejected(RejectReason.TOO_LARGE,
                                f"document is {len(raw)} bytes, the limit is {max_bytes}")
    try:
        # pydantic-core's parser does not recurse on the C stack without limit (it stops at
        # 200 levels), refuses lone surrogates and integers of more than 4300 digits.
        value = pydantic_core.from_json(raw, allow_inf_nan=False)
    except ValueError as exc:
        raise TelemetryRejected(RejectReason.BAD_JSON, str(exc)) from None
    problem = document_problem(value, max_depth)
    if problem is not None:
        raise TelemetryRejected(RejectReason.BAD_SCHEMA, problem)
    return value


def document_problem(value: Any, max_depth: int) -> str | None:
    """Why a parsed document cannot be stored as it is, or None. Iterative: no recursion."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        node, depth = pending.pop()
        if isinstance(node, dict | list):
            if depth > max_depth:
                return f"nested deeper than {max_depth} levels"
            if isinstance(node, dict):
                for key, item in node.items():
                    problem = _text_problem(key)
                    if problem is not None:
                        return f"a key {problem}"
                    pending.append((item, depth + 1))
            else:
                pending.extend((item, depth + 1) for item in node)
        elif isinstance(node, float):
            # `1e400` parses as infinity even with allow_inf_nan=False.
            if not math.isfinite(node):
                return "a number is beyond the range of a double"
        elif isinstance(node, str):
            problem = _text_problem(node)
            if problem is not None:
                return f"a string {problem}"
    return None


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        # PostgreSQL text and jsonb cannot hold NUL.
        return "contains a NUL character"
    return None
