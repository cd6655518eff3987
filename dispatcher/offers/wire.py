"""Wire bodies of the offer routes and the awaiting answer to seller-order-ready."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import Field

from dispatcher.models import OrderId, Point, Reason, RequestModel, ResponseModel
from dispatcher.offers.policy import DispatchStatus, DispatchView, OfferStatus

DriverId = str


class AwaitingResponse(ResponseModel):
    """seller-order-ready in cascade and wave while the order waits for an accept."""

    assigned: Literal[False] = False
    seller_order_id: str
    reason: Literal["AWAITING_ACCEPTANCE"] = "AWAITING_ACCEPTANCE"
    dispatch_status: Literal["PENDING", "OFFERED"]
    # OFFERED: when the open offers expire; PENDING: the dispatch's deadline.
    expires_at: datetime


class OfferItem(ResponseModel):
    offer_id: str
    seller_order_id: str
    driver_id: str
    status: OfferStatus
    round: int
    pickup: Point
    drop: Point | None
    distance_km: float
    created_at: datetime
    expires_at: datetime
    answered_at: datetime | None
    reason: str | None


class OfferList(ResponseModel):
    offers: list[OfferItem]


class DispatchViewBody(ResponseModel):
    seller_order_id: str
    status: DispatchStatus
    mode: Literal["cascade", "wave"]
    attempt: int
    round: int
    deadline_at: datetime
    driver_id: str | None
    reason: str | None
    offers: list[OfferItem]


class OfferQuery(RequestModel):
    status: OfferStatus | None = None


class DeclineOffer(RequestModel):
    reason: Reason | None = None


class ForceAssign(RequestModel):
    driver_id: OrderId = Field(description="an AVAILABLE driver")


class OfferAnswered(ResponseModel):
    offer_id: str
    status: OfferStatus


def awaiting_body(view: DispatchView) -> str:
    open_offers = view.open_offers()
    if open_offers:
        status: Literal["PENDING", "OFFERED"] = "OFFERED"
        until = max(o.expires_at for o in open_offers)
    else:
        status, until = "PENDING", view.deadline_at
    return AwaitingResponse(
        seller_order_id=view.seller_order_id,
        dispatch_status=status,
        expires_at=datetime.fromtimestamp(until, UTC),
    ).model_dump_json()
