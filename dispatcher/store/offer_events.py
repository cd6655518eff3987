"""Offer events for the driver event stream, written in the caller's transaction."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


async def tell_driver(
    conn: Any, driver_id: str, event_type: str, data: Mapping[str, object]
) -> None:
    """Append `event_type` to the driver's event log inside the caller's transaction.

    The one place offers talk to the driver event stream (offer.created,
    offer.withdrawn, offer.expired, delivery.assigned). Until the stream's store
    lands this writes nothing: drivers learn of offers by polling
    `GET /drivers/{id}/offers`.
    """
