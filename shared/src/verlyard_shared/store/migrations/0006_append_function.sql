-- The append fast path (docs/adr/0020-one-round-trip-append.md): one statement, one round trip, in its
-- own implicit transaction, for an append whose event ids are all new, whose streams are distinct and
-- match their expected versions, and whose tracking row is not ahead. It does exactly what the
-- client's four-round-trip path does (ordering lock, versions, insert in request order, NOTIFY with
-- the last position, tracking row), and returns no rows, having written nothing, when any of those
-- checks fails: the client then takes the full path, which decides the duplicate, the conflict or
-- the error under the same lock.
CREATE OR REPLACE FUNCTION verlyard_append(
    p_event_ids text[], p_stream_ids text[], p_types text[], p_schema_versions int[], p_datas jsonb[],
    p_actors text[], p_correlations text[], p_causations text[],
    p_request_streams text[], p_request_expected int[], p_request_sizes int[],
    p_channel text, p_consumer text, p_position bigint
) RETURNS TABLE (out_position bigint, out_event_id text, out_version int)
LANGUAGE plpgsql AS $$
DECLARE
    v_versions int[] := '{}';
    v_current int;
    v_tracked bigint;
    v_positions bigint[];
    v_ids text[];
    v_vers int[];
    i int;
BEGIN
    LOCK TABLE events IN EXCLUSIVE MODE;
    IF EXISTS (SELECT 1 FROM events e WHERE e.event_id = ANY (p_event_ids)) THEN
        RETURN;  -- a retry (or a clash): the full path tells which
    END IF;
    FOR i IN 1 .. coalesce(array_length(p_request_streams, 1), 0) LOOP
        SELECT coalesce(max(e.version), 0) INTO v_current FROM events e WHERE e.stream_id = p_request_streams[i];
        IF p_request_expected[i] <> -1 AND p_request_expected[i] <> v_current THEN
            RETURN;  -- wrong expected version: the full path raises it with the stream's version
        END IF;
        v_versions := v_versions || ARRAY(SELECT v_current + g FROM generate_series(1, p_request_sizes[i]) AS g);
    END LOOP;
    IF p_consumer IS NOT NULL THEN
        SELECT t.position INTO v_tracked FROM tracking t WHERE t.consumer = p_consumer FOR UPDATE;
        IF v_tracked IS NOT NULL AND v_tracked > p_position THEN
            RETURN;  -- the tracking row is ahead: the full path raises TrackingMovedBackwards
        END IF;
    END IF;
    WITH inserted AS (
        INSERT INTO events (event_id, stream_id, version, type, schema_version, data, actor, correlation_id,
                            causation_id)
        SELECT e.event_id, e.stream_id, e.version, e.type, e.schema_version, e.data, e.actor, e.correlation_id,
               e.causation_id
        FROM unnest(p_event_ids, p_stream_ids, v_versions, p_types, p_schema_versions, p_datas, p_actors,
                    p_correlations, p_causations)
             WITH ORDINALITY AS e(event_id, stream_id, version, type, schema_version, data, actor,
                                  correlation_id, causation_id, n)
        ORDER BY e.n
        RETURNING events.position, events.event_id, events.version
    )
    SELECT array_agg(x.position ORDER BY x.position), array_agg(x.event_id ORDER BY x.position),
           array_agg(x.version ORDER BY x.position)
    INTO v_positions, v_ids, v_vers
    FROM inserted x;
    PERFORM pg_notify(p_channel, v_positions[array_upper(v_positions, 1)]::text);
    IF p_consumer IS NOT NULL THEN
        INSERT INTO tracking (consumer, position) VALUES (p_consumer, p_position)
        ON CONFLICT (consumer) DO UPDATE SET position = EXCLUDED.position, updated_at = now();
    END IF;
    RETURN QUERY SELECT * FROM unnest(v_positions, v_ids, v_vers);
END;
$$;
