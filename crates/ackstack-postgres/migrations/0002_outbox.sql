-- ackstack transactional outbox, version 1 (PostgreSQL 13 or later: gen_random_uuid).
--
-- One row per message a handler sent through `tx.outbox()`, written in the same transaction
-- as the handler's effects and its inbox row. The relay publishes pending rows in id order
-- (per destination and key), then marks them sent (or deletes them). Safe to run more than
-- once.
CREATE TABLE IF NOT EXISTS ackstack_outbox (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    destination     text        NOT NULL,
    message_id      text        NOT NULL DEFAULT gen_random_uuid()::text,
    key             bytea,
    payload         bytea       NOT NULL,
    header_names    text[]      NOT NULL DEFAULT '{}',
    header_values   bytea[]     NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    sent_at         timestamptz,
    parked_at       timestamptz
);

-- Pending rows in send order, and the predecessors of a row of the same destination and key.
CREATE INDEX IF NOT EXISTS ackstack_outbox_pending_idx ON ackstack_outbox (id)
    WHERE sent_at IS NULL AND parked_at IS NULL;
CREATE INDEX IF NOT EXISTS ackstack_outbox_key_idx ON ackstack_outbox (destination, key, id)
    WHERE sent_at IS NULL AND parked_at IS NULL;
-- The retention sweep of sent rows (kept only when a retention is configured).
CREATE INDEX IF NOT EXISTS ackstack_outbox_sent_at_idx ON ackstack_outbox (sent_at)
    WHERE sent_at IS NOT NULL;
