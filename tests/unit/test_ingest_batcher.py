"""Batches close on size or age, merge device updates, and remember what they acknowledge."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kubiot_contract.telemetry import RejectReason
from kubiot_contract.topics import IdentityKind
from kubiot_ingest.batcher import Batcher, LastSeenMemo, single
from kubiot_ingest.records import (
    DeadLetter,
    DeviceUpdate,
    InboundMessage,
    TelemetryRecords,
    TelemetryRow,
)

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
DEVICE = IdentityKind.DEVICE


def inbound(mid: int, at: datetime = T0) -> InboundMessage:
    return InboundMessage(mid, "acme/devices/pump-1/telemetry", b"{}", at)


def telemetry(device: str = "pump-1", metrics: int = 1, ts: datetime = T0) -> TelemetryRecords:
    rows: list[TelemetryRow] = [(ts, device, "", 0, f"m{i}", 1.0, None) for i in range(metrics)]
    return TelemetryRecords(DEVICE, device, rows, ts)


def test_a_batch_closes_when_it_holds_enough_rows() -> None:
    batcher = Batcher(max_rows=5, max_delay_s=10)
    batcher.add(inbound(1), telemetry(metrics=2), now=0.0)
    assert not batcher.is_due(0.1)
    batcher.add(inbound(2), telemetry(metrics=2), now=0.2)
    # 4 telemetry rows + 1 device row
    assert batcher.is_due(0.2)
    batch = batcher.take()
    assert batch.receipts == [(0, 1), (0, 2)]
    assert batcher.pending_messages == 0
    assert batcher.deadline() is None


def test_a_batch_closes_when_its_first_message_is_old_enough() -> None:
    batcher = Batcher(max_rows=1000, max_delay_s=0.2)
    assert not batcher.is_due(100.0)  # nothing pending, nothing due
    batcher.add(inbound(1), telemetry(), now=10.0)
    batcher.add(inbound(2), telemetry(), now=10.15)
    assert batcher.deadline() == pytest.approx(10.2)
    assert not batcher.is_due(10.19)
    assert batcher.is_due(10.21)


def test_room_never_lets_a_batch_take_more_messages_than_rows_it_has_left() -> None:
    batcher = Batcher(max_rows=10, max_delay_s=1)
    assert batcher.room() == 10
    batcher.add(inbound(1), telemetry(metrics=4), now=0)
    assert batcher.room() == 5  # 4 rows and the device's last_seen
    batcher.add(inbound(2), telemetry(metrics=9), now=0)
    assert batcher.room() == 1


def test_device_updates_merge_in_arrival_order() -> None:
    batcher = Batcher(max_rows=100, max_delay_s=1)
    later = T0 + timedelta(seconds=5)
    batcher.add(inbound(1), DeviceUpdate(DEVICE, "pump-1", T0, online=True), now=0)
    batcher.add(inbound(2), DeviceUpdate(DEVICE, "pump-1", T0, reported='{"a":1}'), now=0)
    batcher.add(inbound(3, later), telemetry(), now=0)
    batcher.add(inbound(4), DeviceUpdate(DEVICE, "pump-1", T0, online=False), now=0)
    batcher.add(inbound(5), telemetry(device="pump-2"), now=0)
    batch = batcher.take()
    assert batch.device_updates() == [
        DeviceUpdate(DEVICE, "pump-1", later, online=False, reported='{"a":1}'),
        DeviceUpdate(DEVICE, "pump-2", T0),
    ]
    assert batch.receipts == [(0, 1), (0, 2), (0, 3), (0, 4), (0, 5)]


def test_dead_letters_travel_with_the_batch_and_are_acknowledged_with_it() -> None:
    letter = DeadLetter(T0, "acme/devices/pump-1/telemetry", b"{", RejectReason.BAD_JSON, "x")
    batch = single(inbound(9), letter)
    assert batch.dead_letters == [letter]
    assert batch.receipts == [(0, 9)]
    assert batch.telemetry == []
    assert batch.device_updates() == []


def test_sample_times_feed_the_lag_histogram() -> None:
    batcher = Batcher(max_rows=100, max_delay_s=1)
    batcher.add(inbound(1), telemetry(ts=T0), now=0)
    batcher.add(inbound(2), telemetry(ts=T0 + timedelta(seconds=1)), now=0)
    assert batcher.take().sample_times == [T0, T0 + timedelta(seconds=1)]


def test_last_seen_is_written_again_only_once_it_has_moved_on() -> None:
    memo = LastSeenMemo(resolution=timedelta(seconds=10))
    at = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
    seen = DeviceUpdate(IdentityKind.DEVICE, "pump-1", at)
    assert memo.due([seen]) == [seen]  # never written by this writer
    memo.written([seen])
    soon = DeviceUpdate(IdentityKind.DEVICE, "pump-1", at + timedelta(seconds=3))
    assert memo.due([soon]) == []
    online = DeviceUpdate(IdentityKind.DEVICE, "pump-1", at + timedelta(seconds=4), online=True)
    later = DeviceUpdate(IdentityKind.DEVICE, "pump-1", at + timedelta(seconds=10))
    other = DeviceUpdate(IdentityKind.GATEWAY, "pump-1", at)
    assert memo.due([online]) == [online]  # presence is always written
    assert memo.due([later, other]) == [later, other]
    memo.forget()
    assert memo.due([soon]) == [soon]
