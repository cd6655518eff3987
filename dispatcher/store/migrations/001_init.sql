-- Initial schema: drivers, zones (fencing epochs), deliveries, history, webhook outbox.

CREATE TABLE zones (
    zone_id     text PRIMARY KEY,
    -- Fencing token: bumped by each activation of the zone's actor, checked by each
    -- of its writes, so a stale incarnation cannot commit.
    epoch       bigint NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    activated_at timestamptz
);

CREATE TABLE drivers (
    id                    text PRIMARY KEY,
    name                  text NOT NULL,
    phone                 text,
    vehicle_type          text,
    token_hash            bytea NOT NULL UNIQUE,
    status                text NOT NULL DEFAULT 'OFFLINE'
                          CHECK (status IN ('AVAILABLE', 'BUSY', 'OFFLINE')),
    is_active             boolean NOT NULL DEFAULT true,
    lat                   double precision,
    lon                   double precision,
    -- recordedAt of the newest accepted ping: older pings are ignored.
    location_recorded_at  timestamptz,
    -- Heartbeat: time of the newest accepted fix, never in the future.
    last_seen_at          timestamptz,
    zone_id               text,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    CHECK ((lat IS NULL) = (lon IS NULL))
);

-- The PostgreSQL fallback lookup scans this partial index by bounding box.
CREATE INDEX drivers_dispatchable_idx ON drivers (lat, lon)
    WHERE status = 'AVAILABLE' AND is_active AND lat IS NOT NULL;
CREATE INDEX drivers_zone_idx ON drivers (zone_id);

CREATE TABLE deliveries (
    -- Invariant 2 (docs/API.md#invariants): one delivery per sellerOrderId (also the idempotency key).
    seller_order_id  text PRIMARY KEY,
    assignment_id    text NOT NULL UNIQUE,
    driver_id        text NOT NULL REFERENCES drivers (id),
    zone_id          text NOT NULL,
    status           text NOT NULL
                     CHECK (status IN ('ASSIGNED', 'PICKED_UP', 'DELIVERED', 'FAILED', 'CANCELLED')),
    pickup_lat       double precision NOT NULL,
    pickup_lon       double precision NOT NULL,
    drop_lat         double precision,
    drop_lon         double precision,
    distance_km      double precision NOT NULL,
    -- The exact bytes of the first answer: every retry replays them.
    response_body    text NOT NULL,
    -- Last webhook sequence number used for this order.
    sequence         integer NOT NULL DEFAULT 1,
    failure_reason   text,
    assigned_at      timestamptz NOT NULL DEFAULT now(),
    picked_up_at     timestamptz,
    delivered_at     timestamptz,
    failed_at        timestamptz,
    cancelled_at     timestamptz
);

-- Invariant 1 (docs/API.md#invariants): a driver has at most one active delivery, whatever any process believes.
CREATE UNIQUE INDEX deliveries_one_active_per_driver
    ON deliveries (driver_id) WHERE status IN ('ASSIGNED', 'PICKED_UP');

CREATE TABLE delivery_history (
    id               bigserial PRIMARY KEY,
    seller_order_id  text NOT NULL REFERENCES deliveries (seller_order_id),
    status           text NOT NULL,
    at               timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX delivery_history_order_idx ON delivery_history (seller_order_id, id);

CREATE TABLE webhook_outbox (
    id               bigserial PRIMARY KEY,
    -- Standard Webhooks `webhook-id`: the same on every attempt of one event.
    webhook_id       text NOT NULL UNIQUE,
    event_type       text NOT NULL,
    seller_order_id  text NOT NULL,
    -- The exact body sent on every attempt.
    body             text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    attempts         integer NOT NULL DEFAULT 0,
    delivered_at     timestamptz,
    -- Set when retries are exhausted; the row stays for operators.
    failed_at        timestamptz,
    last_status      integer,
    last_error       text
);
CREATE INDEX webhook_outbox_due_idx ON webhook_outbox (next_attempt_at)
    WHERE delivered_at IS NULL AND failed_at IS NULL;

CREATE TABLE webhook_endpoints (
    url              text PRIMARY KEY,
    -- Set when the endpoint answered 410 Gone: no more attempts to it.
    disabled_at      timestamptz,
    disabled_reason  text
);
