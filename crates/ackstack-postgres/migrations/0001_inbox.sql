-- ackstack transactional inbox, version 1.
--
-- One row per (consumer, key) whose effects were committed. The consumer's handler inserts
-- the row in the same transaction as its effects, so a redelivered message finds it and is
-- acknowledged without running again. Safe to run more than once.
CREATE TABLE IF NOT EXISTS ackstack_inbox (
    consumer    text        NOT NULL,
    key         bytea       NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, key)
);

-- The retention sweeper deletes the oldest rows first.
CREATE INDEX IF NOT EXISTS ackstack_inbox_received_at_idx ON ackstack_inbox (received_at);
