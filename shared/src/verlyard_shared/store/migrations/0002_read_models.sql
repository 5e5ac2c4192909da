-- The API's read models: projections of the event log, rebuilt from it at any time (`verlyard replay`).
-- Written only by the projector (verlyard_api/adapters/pg_projector.py), in the same transaction as its
-- `tracking` row (consumer 'projector'), so every row reflects the log up to that position exactly.
-- Never edit this file once applied; add 0003_*.sql.

CREATE TABLE pipelines (
    id                  text        PRIMARY KEY,
    name                text        NOT NULL,
    status              text        NOT NULL
        CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')),
    labels              jsonb       NOT NULL DEFAULT '{}',
    priority            integer     NOT NULL DEFAULT 0,
    -- json (not jsonb) keeps the stages in the order the user wrote them.
    spec                json        NOT NULL,
    submitted_by        text        NOT NULL,
    correlation_id      text        NOT NULL,
    idempotency_key     text,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL,
    finished_at         timestamptz,
    cancel_requested    boolean     NOT NULL DEFAULT false,
    reason              text        NOT NULL DEFAULT '',
    failed_stages       jsonb       NOT NULL DEFAULT '[]',
    retries             integer     NOT NULL DEFAULT 0,
    -- The stream version and global position applied last (duplicates at or below are skipped).
    version             integer     NOT NULL,
    position            bigint      NOT NULL,
    -- Position of pipeline.submitted: the list order (newest first) and the list cursor.
    submitted_position  bigint      NOT NULL UNIQUE
);

CREATE INDEX pipelines_status_order ON pipelines (status, submitted_position DESC);

CREATE TABLE stages (
    pipeline_id      text        NOT NULL,
    name             text        NOT NULL,
    ordinal          integer     NOT NULL,
    kind             text        NOT NULL,
    needs            jsonb       NOT NULL DEFAULT '[]',
    "when"           text        NOT NULL,
    priority         integer     NOT NULL DEFAULT 0,
    status           text        NOT NULL
        CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'skipped', 'cancelled')),
    pending_reason   text,
    reason           text        NOT NULL DEFAULT '',
    outputs          json        NOT NULL DEFAULT '{}',
    not_before       timestamptz,
    checkpoint_step  integer,
    checkpoint_path  text,
    finished_at      timestamptz,
    PRIMARY KEY (pipeline_id, name)
);

CREATE TABLE attempts (
    pipeline_id        text        NOT NULL,
    stage              text        NOT NULL,
    id                 text        NOT NULL,
    ordinal            integer     NOT NULL,
    number             integer     NOT NULL,
    agent              text        NOT NULL,
    status             text        NOT NULL
        CHECK (status IN ('placed', 'accepted', 'running', 'succeeded', 'failed', 'lost', 'cancelled')),
    gpus               jsonb       NOT NULL DEFAULT '[]',
    placed_at          timestamptz,
    started_at         timestamptz,
    finished_at        timestamptz,
    exit_code          integer,
    failure_class      text,
    reason             text        NOT NULL DEFAULT '',
    resumed_from_step  integer,
    resume_from_path   text,
    step               integer,
    total_steps        integer,
    PRIMARY KEY (pipeline_id, stage, id)
);

CREATE INDEX attempts_agent ON attempts (agent) WHERE status IN ('placed', 'accepted', 'running');

-- Tokens as recorded by token.created (id, name, role): the projection. A token authenticates only
-- once its event is projected here AND its secret's hash is in token_secrets.
CREATE TABLE tokens (
    id          text        PRIMARY KEY,
    name        text        NOT NULL,
    role        text        NOT NULL CHECK (role IN ('viewer', 'member', 'admin')),
    created_at  timestamptz NOT NULL,
    created_by  text        NOT NULL,
    position    bigint      NOT NULL
);

-- Not a projection: the sha256 of each token's secret, written by the API before it appends
-- token.created (the secret never enters the event log). Rebuilding the read models keeps it.
CREATE TABLE token_secrets (
    token_id       text        PRIMARY KEY,
    secret_sha256  text        NOT NULL UNIQUE,
    created_at     timestamptz NOT NULL DEFAULT now()
);
