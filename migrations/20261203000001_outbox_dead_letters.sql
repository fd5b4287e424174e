-- Poison messages block nobody (issue: exactly once under every fault).
--
-- An outbox row the transport refuses for good (larger than the NATS server's max_payload) is
-- moved here by the relay, with its reason, so that the rows behind it flow on. The scheduler
-- ends what the lost message was for (an assignment that could not be delivered fails its job
-- with the reason) and stamps `handled_at`.
CREATE TABLE outbox_dead (
    id         uuid        PRIMARY KEY,
    subject    text        NOT NULL,
    payload    bytea       NOT NULL,
    headers    jsonb       NOT NULL,
    created_at timestamptz NOT NULL,
    reason     text        NOT NULL,
    dead_at    timestamptz NOT NULL DEFAULT now(),
    handled_at timestamptz
);

CREATE INDEX outbox_dead_unhandled ON outbox_dead (dead_at) WHERE handled_at IS NULL;
