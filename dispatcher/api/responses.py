"""Building JSON responses from models and store records."""

from __future__ import annotations

from typing import Any

import asyncpg
from aiohttp import web
from pydantic import BaseModel

from dispatcher.models import (
    ActiveDelivery,
    DeliveryView,
    DriverView,
    HistoryEntry,
    Point,
)
from dispatcher.store.drivers import DriverRecord


def json_model(
    model: BaseModel, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        text=model.model_dump_json(),
        content_type="application/json",
        headers=headers,
    )


def json_text(
    body: str, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, text=body, content_type="application/json", headers=headers
    )


def driver_view(record: DriverRecord) -> DriverView:
    location = None
    if record.lat is not None and record.lon is not None:
        location = Point(lat=record.lat, lon=record.lon)
    active = None
    if record.active_order is not None:
        active = ActiveDelivery(
            seller_order_id=record.active_order,
            assignment_id=record.active_assignment or "",
            status=record.active_status,
        )
    return DriverView(
        driver_id=record.id,
        name=record.name,
        phone=record.phone,
        vehicle_type=record.vehicle_type,
        status=record.status,
        is_active=record.is_active,
        location=location,
        last_seen_at=record.last_seen_at,
        zone_id=record.zone_id,
        active_delivery=active,
        auto_accept=record.auto_accept,
    )


def delivery_view(row: asyncpg.Record, history: list[asyncpg.Record]) -> DeliveryView:
    drop: Any = None
    if row["drop_lat"] is not None:
        drop = Point(lat=row["drop_lat"], lon=row["drop_lon"])
    return DeliveryView(
        seller_order_id=row["seller_order_id"],
        status=row["status"],
        driver_id=row["driver_id"],
        assignment_id=row["assignment_id"],
        zone_id=row["zone_id"],
        distance_km=row["distance_km"],
        pickup=Point(lat=row["pickup_lat"], lon=row["pickup_lon"]),
        drop=drop,
        assigned_at=row["assigned_at"],
        picked_up_at=row["picked_up_at"],
        delivered_at=row["delivered_at"],
        failed_at=row["failed_at"],
        cancelled_at=row["cancelled_at"],
        failure_reason=row["failure_reason"],
        history=[HistoryEntry(status=h["status"], at=h["at"]) for h in history],
    )
