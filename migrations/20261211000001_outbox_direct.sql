-- Rows whose committing process hands them to its own relay, which publishes them from memory
-- at once (the hot paths). Another relay woken for its own rows must leave these alone while
-- they are young: it would publish them a second time. JetStream drops the copy by its
-- message id, but a plain subscriber to the subject would see it twice.
ALTER TABLE outbox ADD COLUMN direct boolean NOT NULL DEFAULT false;
