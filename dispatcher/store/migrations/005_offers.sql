-- Offers: a dispatch per seller order in the cascade and wave modes, and the offers it
-- makes to drivers. The rules that must hold under any interleaving live here.

-- autoAccept: such a driver is booked at once when chosen, in any mode.
ALTER TABLE drivers ADD COLUMN auto_accept boolean NOT NULL DEFAULT false;
-- Offers this driver let expire in a row (reset by any answer): 3 sets it OFFLINE.
ALTER TABLE drivers ADD COLUMN missed_offers integer NOT NULL DEFAULT 0;
-- The open offer this driver holds, or NULL. It is a column of the driver row, not only
-- a row of `offers`, because every booking and every offer locks the driver row and
-- re-checks its columns after the lock (READ COMMITTED re-evaluation): a condition on
-- another table would be judged on a snapshot taken before a concurrent offer committed.
-- Set and cleared in the same statements that open and close the offer.
ALTER TABLE drivers ADD COLUMN open_offer_id text;

CREATE TABLE dispatches (
    -- One dispatch per order; a retry after it gave up (or a redispatch) starts a new
    -- attempt on the same row.
    seller_order_id  text PRIMARY KEY,
    zone_id          text NOT NULL,
    mode             text NOT NULL CHECK (mode IN ('cascade', 'wave')),
    status           text NOT NULL
                     CHECK (status IN ('PENDING', 'OFFERED', 'ASSIGNED', 'UNASSIGNED', 'CANCELLED')),
    attempt          integer NOT NULL DEFAULT 1,
    -- Offers (cascade) or waves (wave) made in this attempt.
    round            integer NOT NULL DEFAULT 0,
    pickup_lat       double precision NOT NULL,
    pickup_lon       double precision NOT NULL,
    drop_lat         double precision,
    drop_lon         double precision,
    deadline_at      timestamptz NOT NULL,
    -- Why it gave up: NO_DRIVER_ACCEPTED or NO_DRIVER_AVAILABLE.
    reason           text,
    driver_id        text REFERENCES drivers (id),
    -- Webhooks sent for this order before its delivery exists (delivery.unassigned):
    -- delivery.assigned continues the count, so Vendure's `sequence` only grows.
    sequence         integer NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    ended_at         timestamptz,
    CHECK ((status IN ('PENDING', 'OFFERED')) = (ended_at IS NULL)),
    CHECK ((status = 'ASSIGNED') = (driver_id IS NOT NULL))
);
-- Zone restarts and the ingress backstop find the open dispatches by zone and deadline.
CREATE INDEX dispatches_open_idx ON dispatches (zone_id, deadline_at)
    WHERE status IN ('PENDING', 'OFFERED');

CREATE TABLE offers (
    offer_id         text PRIMARY KEY,
    seller_order_id  text NOT NULL REFERENCES dispatches (seller_order_id),
    attempt          integer NOT NULL,
    round            integer NOT NULL,
    driver_id        text NOT NULL REFERENCES drivers (id),
    status           text NOT NULL
                     CHECK (status IN ('OPEN', 'ACCEPTED', 'DECLINED', 'EXPIRED', 'WITHDRAWN')),
    distance_km      double precision NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    -- expires_at plus the grace: the last instant an accept counts, and the first one
    -- after which the offer may expire. Stored, so that the grace has one home (the code).
    accept_by        timestamptz NOT NULL,
    answered_at      timestamptz,
    -- Why it was withdrawn (SUPERSEDED, ORDER_CANCELLED, ...) or declined.
    reason           text,
    CHECK (accept_by >= expires_at),
    CHECK ((status = 'OPEN') = (answered_at IS NULL)),
    -- One clock, PostgreSQL's: an accept is never after accept_by and an expiry never
    -- at or before it, so no offer can be both accepted and expired.
    CHECK (status <> 'ACCEPTED' OR answered_at <= accept_by),
    CHECK (status <> 'EXPIRED' OR answered_at > accept_by)
);
-- Invariant 9: a driver holds at most one open offer.
CREATE UNIQUE INDEX offers_one_open_per_driver ON offers (driver_id) WHERE status = 'OPEN';
-- Invariant 10: an order has at most one accepted offer, over all its attempts.
CREATE UNIQUE INDEX offers_one_accepted_per_order ON offers (seller_order_id)
    WHERE status = 'ACCEPTED';
-- A driver is offered one attempt of an order once.
CREATE UNIQUE INDEX offers_once_per_attempt ON offers (seller_order_id, attempt, driver_id);
CREATE INDEX offers_driver_idx ON offers (driver_id, created_at);
