"""Health faults a simulated device can be told to show after it installs a firmware version:
what a bad release does to a real fleet that the OTA status alone does not reveal.

A device acknowledges the update (`ota/status` succeeded, the new version in its twin) and
then, running the faulty version:

- `silent`: stays connected and online but sends no more telemetry;
- `anomalous`: keeps sending, with values far outside their normal range (temperature 95);
- `offline`: disconnects (presence `offline`) and stays away.

Written as `<fault>@<version>[,<fault>@<version>...]`, or `<fault>` alone for every version;
the local stack reads it from the Device annotation `kubiot.io/simulate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

#: The Device annotation the local stack's simulation reads faults from.
SIMULATE_ANNOTATION = "kubiot.io/simulate"
#: The temperature an anomalous device reports (its normal range is 18 to 24).
ANOMALOUS_TEMPERATURE = 95.0


class HealthFault(StrEnum):
    SILENT = "silent"
    ANOMALOUS = "anomalous"
    OFFLINE = "offline"


@dataclass(frozen=True)
class Faults:
    """Which fault (if any) the device shows, by the firmware version it runs."""

    by_version: tuple[tuple[HealthFault, str | None], ...] = ()

    def active(self, firmware: str) -> HealthFault | None:
        for fault, version in self.by_version:
            if version is None or version == firmware:
                return fault
        return None

    def __str__(self) -> str:
        return ",".join(f"{f.value}@{v}" if v else f.value for f, v in self.by_version)


def parse_faults(text: str) -> Faults:
    """`silent@2.0.0,anomalous@2.1.0` into Faults; ValueError names what is wrong."""
    parsed: list[tuple[HealthFault, str | None]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, version = item.partition("@")
        try:
            fault = HealthFault(name.strip())
        except ValueError:
            choices = ", ".join(f.value for f in HealthFault)
            raise ValueError(f"unknown fault {name.strip()!r} (one of {choices})") from None
        if "@" in item and not version.strip():
            raise ValueError(f"{item!r} names no version after '@'")
        parsed.append((fault, version.strip() or None))
    return Faults(tuple(parsed))
