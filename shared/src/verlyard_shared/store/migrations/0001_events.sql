-- The record: an append-only log of every event. Never edit this file once applied; add 0002_*.sql.

CREATE TABLE events (
    -- Global position. Readers only ever see positions in commit order because appends are
    -- serialised by LOCK TABLE events IN EXCLUSIVE MODE (docs/adr/0002-event-store-ordering.md).
    position        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        text        NOT NULL,
    stream_id       text        NOT NULL,
    version         integer     NOT NULL CHECK (version >= 1),
    type            text        NOT NULL,
    schema_version  integer     NOT NULL DEFAULT 1,
    -- The msgspec-encoded event, its "type" tag included.
    data            jsonb       NOT NULL,
    actor           text        NOT NULL,
    correlation_id  text        NOT NULL,
    causation_id    text,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_event_id_uq UNIQUE (event_id),
    -- Optimistic concurrency: two writers can never both claim a stream's next version.
    CONSTRAINT events_stream_version_uq UNIQUE (stream_id, version)
);

-- Append-only: the database itself refuses to rewrite history, whoever asks.
CREATE FUNCTION events_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'restrict_violation';
END;
$$;

CREATE TRIGGER events_no_update_delete
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_append_only();

CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_append_only();

-- How far each consumer has read, written in the same transaction as its effects.
CREATE TABLE tracking (
    consumer    text        PRIMARY KEY,
    position    bigint      NOT NULL CHECK (position >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
