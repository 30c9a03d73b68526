"""Device reports are cut down to what the status schema accepts before they are patched."""

from __future__ import annotations

from kubiot_operator.models.device import DeviceStatus
from kubiot_operator.models.gateway import GatewayStatus
from kubiot_operator.reconcile.reports import admissible_status


def test_a_bad_firmware_version_is_left_out_and_the_rest_is_kept() -> None:
    admitted = admissible_status({
        "online": True, "lastSeen": "2026-01-01T00:00:00Z",
        "reported": {"firmware": "1.2.0 beta"},
        "firmware": {"current": "1.2.0 beta", "state": "installing", "reason": None},
    }, DeviceStatus)

    assert admitted.rejected == ("firmware.current",)
    assert admitted.patch == {"online": True, "lastSeen": "2026-01-01T00:00:00Z",
                              "reported": {"firmware": "1.2.0 beta"},
                              "firmware": {"state": "installing", "reason": None}}


def test_every_bad_field_is_named_and_an_emptied_parent_goes() -> None:
    admitted = admissible_status({"online": True, "firmware": {
        "current": "x" * 80, "stateVersion": "not a version", "state": "s" * 65}}, DeviceStatus)

    assert admitted.rejected == ("firmware.current", "firmware.state", "firmware.stateVersion")
    assert admitted.patch == {"online": True}


def test_fields_a_gateway_has_no_place_for_are_left_out_without_counting() -> None:
    admitted = admissible_status({"online": False, "reported": {"a": 1},
                                  "firmware": {"current": "1.0"}}, GatewayStatus)

    assert admitted.patch == {"online": False}
    assert admitted.rejected == ()
