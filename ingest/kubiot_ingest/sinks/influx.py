"""The optional InfluxDB sink: telemetry rows as line protocol, one line per sample."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from kubiot_ingest.records import TelemetryRow

MEASUREMENT = "telemetry"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _escape_key(text: str) -> str:
    """Measurement names, tag keys, tag values and field keys."""
    return text.replace("\\", "\\\\").replace(",", r"\,").replace("=", r"\=").replace(" ", r"\ ")


def _escape_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', r"\"") + '"'


def _field(value: float | None, text: str | None) -> str:
    if text is not None:
        return _escape_string(text)
    return repr(float(value if value is not None else 0.0))


def epoch_ns(moment: datetime) -> int:
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def to_line_protocol(tenant: str, rows: Iterable[TelemetryRow]) -> list[str]:
    """Group the rows of each sample into one line: tags tenant/device/stream, seq as a field."""
    samples: dict[tuple[datetime, str, str, int], list[str]] = {}
    for ts, device, stream, seq, metric, value, text in rows:
        samples.setdefault((ts, device, stream, seq), []).append(
            f"{_escape_key(metric)}={_field(value, text)}")
    lines = []
    for (ts, device, stream, seq), fields in samples.items():
        tags = f",tenant={_escape_key(tenant)},device={_escape_key(device)}"
        if stream:
            tags += f",stream={_escape_key(stream)}"
        lines.append(f"{MEASUREMENT}{tags} {','.join(fields)},seq={seq}i {epoch_ns(ts)}")
    return lines


class InfluxSink:
    """Writes telemetry to an InfluxDB 2 bucket through influxdb-client's async API."""

    name = "influx"

    def __init__(self, url: str, org: str, bucket: str, token: str | None, tenant: str,
                 timeout_ms: int = 10_000) -> None:
        self.url, self.org, self.bucket, self.tenant = url, org, bucket, tenant
        self._token = token
        self._timeout_ms = timeout_ms
        self._client: Any = None

    async def write(self, rows: list[TelemetryRow]) -> int:
        """Write the rows; raise on failure. Returns the number of lines written."""
        lines = to_line_protocol(self.tenant, rows)
        if not lines:
            return 0
        if self._client is None:
            from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync

            self._client = InfluxDBClientAsync(url=self.url, token=self._token or "",
                                               org=self.org, timeout=self._timeout_ms)
        await self._client.write_api().write(bucket=self.bucket, org=self.org, record=lines,
                                             write_precision="ns")
        return len(lines)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()
