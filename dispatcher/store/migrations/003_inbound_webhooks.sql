-- Inbound Standard Webhooks ids already accepted, so that one signed message authorizes
-- exactly one event: the same id on another route, or with another body, is refused.
CREATE TABLE inbound_webhooks (
    webhook_id   text PRIMARY KEY,
    -- The route's event, e.g. 'seller-order-ready'.
    event_type   text NOT NULL,
    body_sha256  bytea NOT NULL,
    -- The signed timestamp plus the tolerance and a margin: after it, no message with this
    -- id and that timestamp can pass the signature check, so the row can go.
    expires_at   timestamptz NOT NULL
);
CREATE INDEX inbound_webhooks_expires_idx ON inbound_webhooks (expires_at);
