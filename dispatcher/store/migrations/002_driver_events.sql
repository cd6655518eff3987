-- Driver event log: what each driver's WebSocket stream carries, durable and resumable.

-- One counter row per driver: the next event's seq is seq + 1. Updating it in the
-- writer's transaction makes seq gap-free (a rollback takes the number back) and its
-- row lock serialises the writers of one driver, so seq order is commit order.
CREATE TABLE driver_event_seq (
    driver_id  text PRIMARY KEY REFERENCES drivers (id),
    seq        bigint NOT NULL
);

CREATE TABLE driver_events (
    driver_id  text NOT NULL REFERENCES drivers (id),
    seq        bigint NOT NULL,
    type       text NOT NULL,
    -- The event's `data` object, serialised once, sent as is.
    data       text NOT NULL,
    -- Written just before the commit (clock_timestamp, not the transaction's start):
    -- the message's `at` and the start of the commit-to-send latency.
    at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (driver_id, seq)
);
-- The pruner deletes by age.
CREATE INDEX driver_events_at_idx ON driver_events (at);

-- Orders the sockets of one driver across replicas: the highest generation is the
-- newest, and every replica closes its older ones.
CREATE SEQUENCE driver_socket_generation;
