-- A manual trigger may carry the client's idempotency key. A trigger whose key the schedule's
-- tick history still holds answers with that tick and starts nothing, so a client retrying
-- after a lost answer fires once. Scheduled ticks have no key.
ALTER TABLE schedule_ticks ADD COLUMN idempotency_key text;
CREATE UNIQUE INDEX schedule_ticks_idempotency ON schedule_ticks (schedule_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
