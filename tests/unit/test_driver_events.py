"""Driver event log rules without a database: resume points, the wire form, the OpenAPI entry."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from dispatcher.api.app import ROUTES
from dispatcher.api.openapi import build_openapi
from dispatcher.store.driver_events import DriverEvent, LogPosition, append_driver_event


@pytest.mark.parametrize(
    ("head", "oldest", "after", "start"),
    [
        (0, None, None, 0),  # no events yet, live only
        (7, 1, None, 7),  # no `after`: live only, from the head
        (7, 1, 0, 0),  # everything retained: full replay
        (7, 3, 2, 2),  # resumes right at the oldest retained event
        (7, 3, 1, None),  # seq 2 was pruned: resync
        (7, None, 5, None),  # everything pruned, events missed: resync
        (7, None, 7, 7),  # everything pruned, nothing missed
        (7, 1, 8, None),  # beyond the head: another history, resync
    ],
)
def test_where_a_socket_starts(
    head: int, oldest: int | None, after: int | None, start: int | None
) -> None:
    assert LogPosition(head, oldest).start_after(after) == start


def test_message_wire_form() -> None:
    at = datetime(2026, 12, 2, 14, 30, 0, 123456, tzinfo=UTC)
    event = DriverEvent(
        "drv_1", 3, "delivery.cancelled", at, '{"sellerOrderId":"S-1","reason":null}'
    )
    assert json.loads(event.message()) == {
        "seq": 3,
        "type": "delivery.cancelled",
        "at": "2026-12-02T14:30:00.123Z",
        "data": {"sellerOrderId": "S-1", "reason": None},
    }


async def test_unknown_types_are_refused_before_any_sql() -> None:
    with pytest.raises(ValueError, match="unknown driver event type"):
        await append_driver_event(None, "drv_1", "delivery.teleported", {})  # type: ignore[arg-type]


def test_openapi_documents_the_websocket_route() -> None:
    op = build_openapi(ROUTES)["paths"]["/drivers/{driverId}/events"]["get"]
    assert {"101", "401", "403", "404", "422", "426"} <= set(op["responses"])
    assert "WebSocket" in op["responses"]["101"]["description"]
    assert [p["name"] for p in op["parameters"]] == ["driverId", "after"]
    assert op["security"] == [{"bearer": []}]
