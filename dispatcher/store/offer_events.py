"""Offer events for the driver event stream, written in the caller's transaction."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dispatcher.store.driver_events import append_driver_event


async def tell_driver(
    conn: Any, driver_id: str, event_type: str, data: Mapping[str, object]
) -> None:
    """Append `event_type` to the driver's event log inside the caller's transaction:
    the driver hears of an offer (offer.created, offer.withdrawn, offer.expired) or a
    booking (delivery.assigned) if and only if the transaction commits."""
    await append_driver_event(conn, driver_id, event_type, data)
