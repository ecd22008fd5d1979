-- Compacted numeric samples (ingest_worker/compaction.py): one row per metric and UTC day,
-- or per metric and hour for a metric with more than 4,320 samples that day (3/min).
-- Times: t0 (the first sample, exact), t1 (the last) and dt, int4 deltas in units of tick
-- microseconds (dt[1] = 0); a row whose gaps do not fit keeps its times in ts instead.
-- Values: dk, int4 deltas of integers k with value = k / scale (scale > 0) or k * -scale
-- (scale < 0), the encoding that gives most values back bit for bit; v holds the values it
-- does not give back (NULL elsewhere), or every value when scale is NULL. A regular series
-- of a quantised sensor is runs of equal small words, which lz4 shrinks to little. Rows
-- under 2 kB are not compressed by PostgreSQL: hence days, not hours, for slow metrics.
CREATE TABLE IF NOT EXISTS {schema}.numeric_packed (
    metric_id  integer NOT NULL,
    bucket     timestamptz NOT NULL,
    n          integer NOT NULL,
    t0         timestamptz NOT NULL,
    t1         timestamptz NOT NULL,
    tick       integer NOT NULL DEFAULT 1,
    dt         integer[],
    ts         timestamptz[],
    scale      double precision,
    dk         integer[],
    v          double precision[],
    received   boolean[],  -- NULL when no sample of the row was stamped on receipt
    PRIMARY KEY (metric_id, bucket)
);
ALTER TABLE {schema}.numeric_packed ALTER COLUMN dt SET COMPRESSION lz4;
ALTER TABLE {schema}.numeric_packed ALTER COLUMN ts SET COMPRESSION lz4;
ALTER TABLE {schema}.numeric_packed ALTER COLUMN dk SET COMPRESSION lz4;
ALTER TABLE {schema}.numeric_packed ALTER COLUMN v SET COMPRESSION lz4;
ALTER TABLE {schema}.numeric_packed ALTER COLUMN received SET COMPRESSION lz4;

-- The samples of one packed row. Inlined by the planner into the query that calls it.
CREATE OR REPLACE FUNCTION {schema}.numeric_unpack(
    t0 timestamptz, tick integer, dt integer[], ts timestamptz[], scale double precision,
    dk integer[], v double precision[], r boolean[]
) RETURNS TABLE ("time" timestamptz, value double precision, received boolean)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(u.ts, t0 + (sum(u.dt) OVER w * tick) * interval '1 microsecond'),
           CASE WHEN u.v IS NOT NULL OR scale IS NULL THEN u.v
                WHEN scale > 0 THEN (sum(u.dk) OVER w) / scale
                ELSE (sum(u.dk) OVER w) * -scale END,
           coalesce(u.r, false)
    FROM unnest(dt, ts, dk, v, r) WITH ORDINALITY AS u(dt, ts, dk, v, r, i)
    WINDOW w AS (ORDER BY u.i)
$$;

-- THE read interface of numeric samples: hot rows and compacted rows of one metric (NULL:
-- every metric) with since <= time < until (infinities are clamped to years 1000 and 9999:
-- TimescaleDB's chunk exclusion cannot take them). A hot row whose (metric_id, time) is
-- also packed (a late redelivery) is skipped: the packed value was stored first and wins.
CREATE OR REPLACE FUNCTION {schema}.numeric_series(
    metric integer, since timestamptz, until timestamptz
) RETURNS TABLE ("time" timestamptz, metric_id integer, value double precision,
                received boolean)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    WITH packed AS (
        SELECT p.metric_id, u.time, u.value, u.received
        FROM {schema}.numeric_packed p
        CROSS JOIN LATERAL {schema}.numeric_unpack(p.t0, p.tick, p.dt, p.ts, p.scale, p.dk,
                                                   p.v, p.received) u
        WHERE (p.metric_id = metric OR metric IS NULL)
          AND p.bucket > greatest(since, '1000-01-02 00:00+00') - interval '1 day'
          AND p.bucket < least(until, '9999-01-01 00:00+00')
          AND p.t1 >= since AND u.time >= since AND u.time < until
    )
    SELECT packed.time, packed.metric_id, packed.value, packed.received FROM packed
    UNION ALL
    SELECT h.time, h.metric_id, h.value, h.received FROM {schema}.numeric_values h
    WHERE (h.metric_id = metric OR metric IS NULL)
      AND h.time >= greatest(since, '1000-01-01 00:00+00')
      AND h.time < least(until, '9999-01-01 00:00+00')
      AND NOT EXISTS (SELECT 1 FROM packed q WHERE q.metric_id = h.metric_id AND q.time = h.time)
$$;

-- The time of a metric's newest sample, hot or packed (NULL: none): with numeric_series
-- (metric, numeric_newest(metric), 'infinity') it reads the newest value without a scan.
CREATE OR REPLACE FUNCTION {schema}.numeric_newest(metric integer) RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT greatest(
        (SELECT max(h.time) FROM {schema}.numeric_values h WHERE h.metric_id = metric),
        (SELECT p.t1 FROM {schema}.numeric_packed p WHERE p.metric_id = metric
         ORDER BY p.bucket DESC LIMIT 1))
$$;
