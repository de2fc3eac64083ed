-- The data lifecycle (issue 21; server/interactions_server/storage/_lifecycle.py
-- and _retention.py): the retention policy's daily run, purges by filter.
--
-- Retention removes whole months by detaching their partitions from the log
-- (a moment under lock_timeout, like partition creation), then deletes the
-- dedup keys of the detached rows in small batches and drops the table; what
-- a policy removes inside a month, and every purge, is deleted row by row in
-- small batches of one time slice each. The state tables are never touched.

-- The daily run of the policy: one server of the deployment at a time claims
-- it (a lease, renewed while it works, so that a run whose server died is
-- taken over once the lease has expired), and nobody claims it again until a
-- day after the last finished run. One row, written by the first claim.
CREATE TABLE retention_schedule (
    only_row     boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    holder       text        NOT NULL,  -- host:pid of the server that claimed the run last
    lease_until  timestamptz NOT NULL,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz            -- NULL: the last claimed run has not finished
);

-- Partitions retention has detached from the log (renamed <name>_retired)
-- whose dedup keys are still being deleted: the walk's position (in the
-- order of the partition's (user_id, occurred_at, event_id) index) is
-- saved with each batch, so that a run that stopped half-way is resumed by
-- the next one, counting every row once. The row goes with the table's DROP.
CREATE TABLE retention_detached (
    relname      text        PRIMARY KEY,
    audit_id     bigint      NOT NULL,  -- the audit_log record of the run that detached it
    detached_at  timestamptz NOT NULL DEFAULT now(),
    after_user   text,                  -- the walk's position; NULL: not started
    after_at     timestamptz,
    after_event  uuid
);

-- Adds what one transaction removed to its run's audit_log record (a
-- retention run or a purge: written with its first removal, updated by each
-- later one in the same transaction), so that the record always counts
-- exactly what was removed, also when the run stops half-way.
-- counts: {"events": n, "partitions": n}; detail.removed_by_type: {type: n}.
CREATE FUNCTION audit_add_removed(record bigint, events bigint, by_type jsonb, partitions integer)
RETURNS void
LANGUAGE sql VOLATILE AS $$
    UPDATE audit_log SET
        counts = counts || jsonb_build_object(
            'events', coalesce((counts ->> 'events')::bigint, 0) + events,
            'partitions', coalesce((counts ->> 'partitions')::int, 0) + partitions),
        detail = detail || jsonb_build_object('removed_by_type', (
            SELECT coalesce(jsonb_object_agg(t, n), '{}')
            FROM (
                SELECT t, sum(n)::bigint AS n
                FROM (
                    SELECT key AS t, value::bigint AS n
                    FROM jsonb_each_text(coalesce(detail -> 'removed_by_type', '{}'))
                    UNION ALL
                    SELECT key, value::bigint FROM jsonb_each_text(by_type)
                ) AS parts
                GROUP BY t
            ) AS summed))
    WHERE id = record
$$;

-- ensure_event_partitions (0001), one month at a time: a month whose rows
-- already sit in the default partition (late events of a month retention had
-- detached, before it is created again) is skipped instead of failing the
-- creation of every other month, the ones ahead of the clock included.
CREATE OR REPLACE FUNCTION ensure_event_partitions(first date, last date) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    month date := date_trunc('month', first);
    created integer := 0;
    name text;
BEGIN
    WHILE month <= last LOOP
        name := format('events_%s', to_char(month, 'YYYY_MM'));
        IF to_regclass(name) IS NULL THEN
            BEGIN
                EXECUTE format(
                    'CREATE TABLE %I PARTITION OF events FOR VALUES FROM (%L) TO (%L)',
                    name, month::timestamptz, (month + interval '1 month')::timestamptz);
                created := created + 1;
            EXCEPTION WHEN check_violation THEN
                NULL;  -- the default partition holds rows of this month: they stay there
            END;
        END IF;
        month := month + interval '1 month';
    END LOOP;
    RETURN created;
END $$;
