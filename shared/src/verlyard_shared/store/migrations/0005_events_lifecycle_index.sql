-- The scheduler's start-up scan (verlyard_scheduler/adapters/pg_log.py, _STREAMS) needs, for every
-- pipeline and agent stream, its first event and its ends and retry requests. This partial index holds
-- exactly those rows (about two per pipeline), so a restart reads them from the index instead of
-- scanning every event of the log (R1: a million-event log, docs/benchmarks.md).
-- A plain CREATE INDEX (migrations run in a transaction): appends wait while it builds, about a
-- second per million events on the benchmark machine; docs/operations.md has the rule.
CREATE INDEX IF NOT EXISTS events_lifecycle
    ON events (stream_id) INCLUDE (version, type, position)
    WHERE version = 1
       OR type IN ('pipeline.succeeded', 'pipeline.failed', 'pipeline.cancelled', 'pipeline.retry_requested');
