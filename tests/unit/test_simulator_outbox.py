"""A device keeps telemetry until a PUBACK with reason 0, and backs off between attempts."""

from __future__ import annotations

import pytest

from kubiot_operator.simulator.outbox import (
    NO_MATCHING_SUBSCRIBERS,
    PendingTelemetry,
    RetryPolicy,
    TelemetryOutbox,
)

NOT_AUTHORIZED = 0x87


def message(seq: int) -> PendingTelemetry:
    return PendingTelemetry(seq, "acme/devices/pump-1/telemetry", b'{"seq": %d}' % seq)


def test_a_message_without_a_subscriber_stays_first_in_line() -> None:
    outbox = TelemetryOutbox()
    for seq in range(3):
        outbox.add(message(seq))
    first = outbox.next()
    assert first == message(0)
    assert not outbox.settle(first, NO_MATCHING_SUBSCRIBERS)
    assert not outbox.settle(first, NOT_AUTHORIZED)
    # Sent again as the very same bytes: the same seq and ts, so the ingest keeps it once.
    assert outbox.next() is first
    assert len(outbox) == 3
    assert outbox.delivered == 0
    assert outbox.refusals == {NO_MATCHING_SUBSCRIBERS: 1, NOT_AUTHORIZED: 1}


def test_reason_0_delivers_in_order() -> None:
    outbox = TelemetryOutbox()
    for seq in range(3):
        outbox.add(message(seq))
    sent = []
    while (pending := outbox.next()) is not None:
        assert outbox.settle(pending, 0)
        sent.append(pending.seq)
    assert sent == [0, 1, 2]
    assert outbox.delivered == 3
    assert len(outbox) == 0


def test_a_full_outbox_gives_up_the_oldest_and_counts_it() -> None:
    outbox = TelemetryOutbox(capacity=2)
    for seq in range(5):
        outbox.add(message(seq))
    assert outbox.dropped == 3
    assert [outbox.next()] == [message(3)]
    with pytest.raises(ValueError, match="at least one"):
        TelemetryOutbox(capacity=0)


def test_retries_double_up_to_the_ceiling_with_jitter_in_the_upper_half() -> None:
    policy = RetryPolicy(first=0.2, ceiling=10.0)
    assert [policy.delay(n, jitter=0.0) for n in range(8)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
    assert [policy.delay(n, jitter=0.999) for n in (0, 6, 1000)] == pytest.approx(
        [0.2, 10.0, 10.0], rel=1e-3)
    with pytest.raises(ValueError, match="first <= ceiling"):
        RetryPolicy(first=2.0, ceiling=1.0)
