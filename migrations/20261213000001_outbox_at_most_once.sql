-- Messages that must not be delivered twice (an agent's assignment). JetStream drops a second
-- copy by its id only within its duplicate window, so a relay publishes such a row only while
-- it is younger than half that window, and deletes it unpublished once older: a relay whose
-- delete was lost (PostgreSQL away after the publication) never publishes it again past the
-- window.
ALTER TABLE outbox ADD COLUMN at_most_once boolean NOT NULL DEFAULT false;
