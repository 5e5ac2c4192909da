-- SSH hosts (docs/adr/0011-ssh-hosts.md). Never edit this file once applied; add 0005_*.sql.
--
-- Not a projection of the event log: the log records only non-secret facts (host.added, host.removed,
-- host.probed); this table is the record of each host's credential, which must never enter the log.
-- The credential is stored sealed only (AES-256-GCM, keyed by VERLYARD_SECRET_KEY; `secret_key_id`
-- names the key that sealed it, the host's name is bound in as associated data).

CREATE TABLE hosts (
    name              text        PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    address           text        NOT NULL,
    port              integer     NOT NULL CHECK (port BETWEEN 1 AND 65535),
    ssh_user          text        NOT NULL,
    auth_kind         text        NOT NULL CHECK (auth_kind IN ('password', 'key')),
    secret_key_id     text        NOT NULL,
    secret_ciphertext bytea       NOT NULL,
    host_key          text        NOT NULL,
    host_key_fingerprint text     NOT NULL,
    root              text,
    trainer_python    text        NOT NULL DEFAULT 'python3',
    labels            jsonb       NOT NULL DEFAULT '{}'::jsonb,
    last_probe        jsonb,
    probed_at         timestamptz,
    added_at          timestamptz NOT NULL,
    added_by          text        NOT NULL
);
