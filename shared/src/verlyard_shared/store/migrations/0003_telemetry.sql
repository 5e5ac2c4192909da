-- Telemetry and the indexes the API's agent and dataset views read. Never edit this file once applied;
-- add 0004_*.sql.
--
-- metrics and log_lines are not projections of the event log: they are written by the API's persisters
-- from the VY_METRICS / VY_LOGS streams (idempotently: a redelivered batch inserts nothing). `id` is the
-- live streams' cursor: each persister transaction takes an advisory lock before inserting, so ids
-- commit in order and a reader tailing `id > n` never skips a late commit (docs/adr/0009-live-streams.md).

CREATE TABLE metrics (
    id           bigint      GENERATED ALWAYS AS IDENTITY,
    pipeline_id  text        NOT NULL,
    stage        text        NOT NULL,
    attempt      text        NOT NULL,
    step         bigint      NOT NULL,
    key          text        NOT NULL,
    value        float8      NOT NULL,
    recorded_at  timestamptz NOT NULL,
    PRIMARY KEY (pipeline_id, stage, attempt, step, key),
    CONSTRAINT metrics_id_uq UNIQUE (id)
);

-- The live stream reads one pipeline's new points in id order.
CREATE INDEX metrics_pipeline_id ON metrics (pipeline_id, id);

CREATE TABLE log_lines (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    pipeline_id  text        NOT NULL,
    stage        text        NOT NULL,
    attempt      text        NOT NULL,
    "offset"     bigint      NOT NULL CHECK ("offset" >= 0),
    stream       text        NOT NULL,
    text         text        NOT NULL,
    recorded_at  timestamptz NOT NULL,
    -- An attempt's line numbers are unique: a redelivered batch inserts nothing, pages are by offset.
    CONSTRAINT log_lines_attempt_offset_uq UNIQUE (attempt, "offset")
);

CREATE INDEX log_lines_pipeline_id ON log_lines (pipeline_id, id);
CREATE INDEX log_lines_stage ON log_lines (pipeline_id, stage, attempt);

-- GET /api/v1/agents and /datasets fold their streams' events on read: small partial indexes keep that
-- a scan of those few events, however long the log grows.
CREATE INDEX events_agent_streams ON events (position) WHERE stream_id LIKE 'agent-%';
CREATE INDEX events_dataset_streams ON events (position) WHERE stream_id LIKE 'dataset-%';
