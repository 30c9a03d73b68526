"""The firmware side of the contract: what a device reports on `ota/status`."""

from __future__ import annotations

from enum import StrEnum


class OtaState(StrEnum):
    """The states a device reports on `ota/status`, in the order an update goes through them."""

    DOWNLOADING = "downloading"
    INSTALLING = "installing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def working(self) -> bool:
        """The device is still on it: neither done nor given up."""
        return self in (OtaState.DOWNLOADING, OtaState.INSTALLING)
