"""What a hostile device sends: JSON that is valid but extreme, JSON that almost is, random and
truncated bytes, and topic names. Generated as raw text, so that what Python's own encoder never
writes (`1e400`, lone surrogate escapes, 5,000-digit integers, 100,000 levels of nesting) is
in it."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from hypothesis import settings
from hypothesis import strategies as st

#: The settings every fuzz property runs with: the profile tests/fuzz/conftest.py registers.
FUZZ = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: Far above what any parser needs for its largest input (a few ms); a parser that loops,
#: recurses or allocates per byte of a hostile payload shows up here.
SECONDS_PER_MESSAGE = 1.0

#: The instant the fuzzed messages arrive at, unless a property picks its own.
ARRIVAL = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)

TENANT = "acme"
CONTRACT_TOPICS = [
    f"{TENANT}/devices/pump-1/telemetry", f"{TENANT}/devices/pump-1/telemetry/vibration",
    f"{TENANT}/gateways/hub-1/telemetry", f"{TENANT}/devices/pump-1/state/reported",
    f"{TENANT}/devices/pump-1/presence", f"{TENANT}/gateways/hub-1/presence",
    f"{TENANT}/devices/pump-1/ota/status", f"{TENANT}/devices/pump-1/cmd/ping/result",
    f"{TENANT}/devices/pump-1/state/desired", f"{TENANT}/devices/pump-1/ota/job",
]


@contextmanager
def within(seconds: float = SECONDS_PER_MESSAGE) -> Iterator[None]:
    """Fail if the block takes longer than `seconds` of wall time."""
    started = time.perf_counter()
    yield
    elapsed = time.perf_counter() - started
    assert elapsed < seconds, f"took {elapsed:.3f}s, the bound is {seconds}s"


T = TypeVar("T")
E = TypeVar("E", bound=Exception)


def attempt(call: Callable[[], T], refusal: type[E]) -> T | E:
    """What `call` returns, or the typed refusal it raises, within the time bound. Any other
    exception propagates: that is what the properties look for."""
    with within():
        try:
            return call()
        except refusal as exc:
            return exc


# --- JSON as raw text ------------------------------------------------------------------------

_DIGITS = st.text("0123456789", min_size=1, max_size=400)

json_numbers = st.one_of(
    st.integers().map(str),
    # Integers past the range of a double (about 1.8e308) and up to Python's 4300-digit limit.
    st.builds(lambda sign, digits: sign + "1" * digits, st.sampled_from(["", "-"]),
              st.integers(300, 4400)),
    st.integers(min_value=-(10**400), max_value=10**400).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.builds(lambda sign, mantissa, exponent: f"{sign}{mantissa}e{exponent}",
              st.sampled_from(["", "-"]), _DIGITS, st.integers(-100_000, 100_000)),
    st.sampled_from(["1e400", "-1e400", "1e-400", "NaN", "Infinity", "-Infinity", "-0", "0e0",
                     "1" + "0" * 308, "1" + "0" * 309, "9" * 4300, "9" * 4301, "01", "1.",
                     ".5", "+1", "0x10", str(2**53 + 1), str(2**63), str(-(2**63) - 1)]),
)

_ESCAPES = st.sampled_from([
    '\\"', "\\\\", "\\/", "\\n", "\\t", "\\u0000", "\\ud800", "\\udfff", "\\ud800\\ud800",
    "\\udfff\\ud800", "\\ud83d\\ude00", "\\uffff", "\\ufeff", "\\u202e", "\\x41", "\\", "\\u12",
])
_CHARS = st.one_of(
    st.characters(codec="utf-8", exclude_characters='"\\'),
    _ESCAPES,
    st.integers(0, 0xFFFF).map(lambda code: f"\\u{code:04x}"),
)
json_strings = st.one_of(
    st.lists(_CHARS, max_size=24).map(lambda parts: '"' + "".join(parts) + '"'),
    st.integers(0, 300_000).map(lambda n: '"' + "x" * n + '"'),
)


def _timestamp_text(moment: datetime, offset: str) -> str:
    return json.dumps(moment.replace(tzinfo=None).isoformat() + offset)


_OFFSETS = st.one_of(
    st.sampled_from(["", "Z", "+00:00", "-23:59", "+23:59", "+24:00", "-00:00", "+1", "z"]),
    st.builds(lambda sign, hours, minutes: f"{sign}{hours:02d}:{minutes:02d}",
              st.sampled_from("+-"), st.integers(0, 99), st.integers(0, 99)),
)
json_timestamps = st.one_of(
    # Near the arrival: most reach the stored window check, some fall outside it.
    st.builds(_timestamp_text, st.datetimes(ARRIVAL.replace(tzinfo=None) - timedelta(days=200),
                                            ARRIVAL.replace(tzinfo=None) + timedelta(days=2)),
              _OFFSETS),
    # Anywhere in years 1..9999, and at either end, with offsets that move the instant past it.
    st.builds(_timestamp_text, st.datetimes(), _OFFSETS),
    st.builds(_timestamp_text, st.one_of(st.datetimes(min_value=datetime(9999, 12, 30)),
                                         st.datetimes(max_value=datetime(1, 1, 2))), _OFFSETS),
    st.sampled_from(['"9999-12-31T23:59:59-23:59"', '"0001-01-01T00:00:00+23:59"',
                     '"9999-12-31T23:59:59.999999-00:01"', '"0001-01-01T00:00:00.000001+00:01"',
                     '"10000-01-01T00:00:00Z"', '"0000-01-01T00:00:00Z"', '"2026-02-30T00:00Z"',
                     '"2026-11-25T12:00:00+05:30"', '"yesterday"', '""', "1e20", "-1e20",
                     "253402300800", "-62135596801", "2e10", "20000000001", "1795082400.5"]),
    json_numbers,
)

json_scalars = st.one_of(json_numbers, json_strings, json_timestamps,
                         st.sampled_from(["true", "false", "null"]))


def _array(items: list[str]) -> str:
    return "[" + ",".join(items) + "]"


def _object(members: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{key}:{value}" for key, value in members) + "}"


json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=6).map(_array),
                               st.lists(st.tuples(json_strings, children),
                                        max_size=6).map(_object)),
    max_leaves=24,
)


def _nested(depth: int, opener: str, closer: str, inner: str, closed: bool) -> str:
    return opener * depth + inner + (closer * depth if closed else "")


deep_json = st.builds(
    lambda depth, pair, inner, closed: _nested(depth, pair[0], pair[1], inner, closed),
    st.integers(1, 100_000),
    st.sampled_from([("[", "]"), ('{"a":', "}"), ('{"state":', "}"), ("[[", "]]")]),
    st.one_of(st.just("1"), json_scalars),
    st.booleans(),
)

# --- telemetry-shaped ------------------------------------------------------------------------

_METRIC_NAMES = st.one_of(
    st.sampled_from(['"flow"', '"t"', '"_x.y-z"', '"' + "m" * 64 + '"', '"' + "m" * 65 + '"',
                     '"bad key"', '""', '"\\u0000"', '"flow\\n"', '"fl\\u00f6w"']),
    json_strings,
)
_METRIC_VALUES = st.one_of(json_numbers, json_strings, st.sampled_from(["true", "false", "null"]),
                           json_values)
_values_objects = st.lists(st.tuples(_METRIC_NAMES, _METRIC_VALUES), max_size=8).map(_object)
_SAMPLE_FIELDS = {
    '"v"': st.one_of(st.just("1"), json_numbers),
    '"ts"': json_timestamps,
    '"seq"': st.one_of(st.integers(0, 2**63 - 1).map(str), json_numbers),
    '"values"': st.one_of(_values_objects, json_values),
    '"extra"': json_values,
}


@st.composite
def sample_objects(draw: st.DrawFn) -> str:
    """A telemetry sample with any subset of its fields, each valid or hostile."""
    members = [(key, draw(value)) for key, value in _SAMPLE_FIELDS.items()
               if (key in ('"ts"', '"values"') and draw(st.integers(0, 9)) > 0)
               or draw(st.booleans())]
    return _object(draw(st.permutations(members)))


_VALID_FIELDS = {
    '"ts"': st.builds(_timestamp_text,
                      st.datetimes(ARRIVAL.replace(tzinfo=None) - timedelta(days=30),
                                   ARRIVAL.replace(tzinfo=None)), st.just("Z")),
    '"seq"': st.integers(0, 2**63 - 1).map(str),
    '"values"': st.dictionaries(st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True),
                                st.one_of(st.integers(-(2**53), 2**53).map(str),
                                          st.floats(allow_nan=False,
                                                    allow_infinity=False).map(repr),
                                          st.sampled_from(["true", "false", '"eco"'])),
                                min_size=1, max_size=4).map(
        lambda values: _object([(json.dumps(k), v) for k, v in values.items()])),
}
_VALID_NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True).map(json.dumps)
_HOSTILE_FIELDS = {
    '"ts"': json_timestamps,
    '"seq"': json_numbers,
    '"v"': json_numbers,
    # Mostly valid names, so that the values behind them are what gets checked.
    '"values"': st.lists(st.one_of(st.tuples(_VALID_NAMES, json_numbers),
                                   st.tuples(_VALID_NAMES, _METRIC_VALUES),
                                   st.tuples(_METRIC_NAMES, _METRIC_VALUES)),
                         min_size=1, max_size=3).map(_object),
}


@st.composite
def nearly_valid_samples(draw: st.DrawFn) -> str:
    """A valid sample with one field made hostile: the cheapest way past the checks that come
    first to the ones behind them."""
    members = {key: draw(value) for key, value in _VALID_FIELDS.items()}
    hostile = draw(st.sampled_from(sorted(_HOSTILE_FIELDS)))
    replacement = draw(_HOSTILE_FIELDS[hostile])
    if hostile == '"values"' and draw(st.booleans()):
        # Keep the valid metrics and add the hostile ones.
        replacement = members['"values"'][:-1] + "," + replacement[1:]
    members[hostile] = replacement
    return _object(list(members.items()))


telemetry_texts = st.one_of(
    sample_objects(), nearly_valid_samples(),
    st.lists(st.one_of(sample_objects(), nearly_valid_samples()), max_size=5).map(_array))


# --- bytes -----------------------------------------------------------------------------------

def _mutate(raw: bytes, kind: str, where: int, insert: bytes) -> bytes:
    at = where % (len(raw) + 1)
    if kind == "truncate":
        return raw[:at]
    if kind == "insert":
        return raw[:at] + insert + raw[at:]
    if kind == "replace":
        return raw[:at] + insert + raw[at + len(insert):]
    return raw + insert


def mutated(base: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """`base` truncated, or with bytes inserted or overwritten somewhere (invalid UTF-8, NUL,
    stray brackets and quotes)."""
    return st.builds(_mutate, base, st.sampled_from(["truncate", "insert", "replace", "append"]),
                     st.integers(0, 2**20),
                     st.one_of(st.binary(min_size=1, max_size=8),
                               st.sampled_from([b"\x00", b"\xff", b"\xed\xa0\x80", b"\xc0\x80",
                                                b'"', b"[", b"}", b"\\u", b"1e999"])))


def _utf8(text: str) -> bytes:
    return text.encode()


device_payloads: st.SearchStrategy[bytes] = st.one_of(
    telemetry_texts.map(_utf8),
    json_values.map(_utf8),
    deep_json.map(_utf8),
    st.sampled_from([b"online", b"offline", b'"online"', b' "offline" ', b"", b"null"]),
    st.binary(max_size=512),
    mutated(st.one_of(telemetry_texts.map(_utf8), json_values.map(_utf8))),
)

# --- topics ----------------------------------------------------------------------------------

_LEVELS = st.one_of(
    st.sampled_from([TENANT, "other", "devices", "gateways", "pump-1", "hub-1", "telemetry",
                     "state", "reported", "desired", "presence", "ota", "status", "job", "cmd",
                     "ping", "result", "vibration", "+", "#", "$SYS", "$share", "", "Pump",
                     "pump-1\n", "pump-1\x00", "p" * 63, "p" * 64, "\ud800", "-pump", "pump-"]),
    st.text(max_size=16),
)
telemetry_topics = st.sampled_from([t for t in CONTRACT_TOPICS if "/telemetry" in t])
topics: st.SearchStrategy[str] = st.one_of(
    st.sampled_from(CONTRACT_TOPICS),
    st.lists(_LEVELS, max_size=8).map("/".join),
    st.builds(lambda topic, suffix: topic + suffix, st.sampled_from(CONTRACT_TOPICS),
              st.sampled_from(["\n", "/", "/x", "\x00", " ", "\u2028"])),
    st.text(max_size=300),
)

arrivals: st.SearchStrategy[datetime] = st.one_of(
    st.just(ARRIVAL), st.datetimes(timezones=st.just(UTC)))


def finite_json_python() -> st.SearchStrategy[object]:
    """Python values json.dumps can write and a device may send (for manifests we sign)."""
    return st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**400), max_value=10**400),
                  st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30)),
        lambda children: st.one_of(st.lists(children, max_size=4),
                                   st.dictionaries(st.text(max_size=8), children, max_size=4)),
        max_leaves=12,
    )

