-- Compacted numeric samples (ingest_worker/compaction.py): one row per metric and UTC day,
-- or per metric and hour for a metric with more than 4,320 samples that day (3/min).
-- Laid out for reads: sample i (1-based) of a row is decoded from element i of its arrays,
-- with no running sum, so a read unnests only the elements of its time range.
-- Times: t0 (the first sample, exact) and t1 (the last). A regular row (every gap the same,
-- or a single sample) stores no time per sample: time i = t0 + (i - 1) * step microseconds
-- (step > 0). Otherwise step is NULL and toff holds int4 offsets from t0 in units of tick
-- microseconds (1 s, 1 ms or 1 µs, the largest that divides them all), or ts the times
-- themselves when an offset does not fit int4.
-- Values: integers k with value = k / scale (scale > 0) or k * -scale (scale < 0), the
-- encoding that gives most values back bit for bit; k = kb + k2[i] (int2, when the row's k
-- span at most 65,536 values) or kb + k4[i] (int4). v holds the values that do not come back
-- that way (NULL elsewhere), or every value when scale is NULL.
-- Rows up to ~8 kB are stored as they are, in the table's own pages (toast_tuple_target):
-- a read then decompresses nothing and never visits the TOAST table. Bigger ones (fast
-- metrics, many odd values) are lz4-compressed first.
-- A plain table, not a hypertable: one row per metric and day is few rows, and a read of a
-- hypertable plans every chunk its bounds do not exclude at plan time (157 weekly chunks
-- for 36 months: ~9 ms of planning per read). Retention deletes rows (maintenance.py).
CREATE TABLE IF NOT EXISTS {schema}.numeric_packed (
    metric_id  integer NOT NULL,
    bucket     timestamptz NOT NULL,
    n          integer NOT NULL,
    t0         timestamptz NOT NULL,
    t1         timestamptz NOT NULL,
    step       bigint,
    tick       integer NOT NULL DEFAULT 1,
    toff       integer[],
    ts         timestamptz[],
    scale      double precision,
    kb         bigint NOT NULL DEFAULT 0,
    k2         smallint[],
    k4         integer[],
    v          double precision[],
    received   boolean[],  -- NULL when no sample of the row was stamped on receipt
    PRIMARY KEY (metric_id, bucket)
) WITH (toast_tuple_target = 8160);
ALTER TABLE {schema}.numeric_packed ALTER COLUMN toff SET COMPRESSION lz4;
ALTER TABLE {schema}.numeric_packed ALTER COLUMN ts SET COMPRESSION lz4;
ALTER TABLE {schema}.numeric_packed ALTER COLUMN k2 SET COMPRESSION lz4;
ALTER TABLE {schema}.numeric_packed ALTER COLUMN k4 SET COMPRESSION lz4;
ALTER TABLE {schema}.numeric_packed ALTER COLUMN v SET COMPRESSION lz4;
ALTER TABLE {schema}.numeric_packed ALTER COLUMN received SET COMPRESSION lz4;

-- The samples of one packed row, for compaction's merge
-- (numeric_series decodes the same way, inline). The regular time axis comes from
-- generate_series, zipped with the arrays by ROWS FROM.
CREATE OR REPLACE FUNCTION {schema}.numeric_unpack(
    t0 timestamptz, n integer, step bigint, tick integer, toff integer[], ts timestamptz[],
    scale double precision, kb bigint, k2 smallint[], k4 integer[], v double precision[],
    r boolean[]
) RETURNS TABLE ("time" timestamptz, value double precision, received boolean)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(u.t, u.ts, t0 + (u.o::bigint * tick) * interval '1 microsecond'),
           CASE WHEN u.v IS NOT NULL OR scale IS NULL THEN u.v
                WHEN scale > 0 THEN (kb + coalesce(u.k2, u.k4)) / scale
                ELSE (kb + coalesce(u.k2, u.k4)) * -scale END,
           coalesce(u.r, false)
    FROM ROWS FROM (
        generate_series(t0, t0 + (n - 1) * step * interval '1 microsecond',
                        step * interval '1 microsecond'),
        unnest(k2), unnest(k4), unnest(v), unnest(r), unnest(toff), unnest(ts)
    ) AS u(t, k2, k4, v, r, o, ts)
$$;

-- THE read interface of numeric samples: hot rows and compacted rows of one metric (NULL:
-- every metric) with since <= time < until (infinities are clamped to years 1000 and 9999).
-- A regular packed row is first cut to the samples of the range (s: computed once per row,
-- with a sample of slack either side; the time filter is exact), then its arrays are
-- unnested by set-returning functions in the select list, which run in step and, unlike
-- functions in FROM, store nothing in between. A hot row whose (metric_id, time) is also
-- packed (a late redelivery) is skipped: the packed value was stored first and wins.
CREATE OR REPLACE FUNCTION {schema}.numeric_series(
    metric integer, since timestamptz, until timestamptz
) RETURNS TABLE ("time" timestamptz, metric_id integer, value double precision,
                received boolean)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT x.t, x.metric_id,
           CASE WHEN x.v IS NOT NULL OR x.scale IS NULL THEN x.v
                WHEN x.scale > 0 THEN (x.kb + coalesce(x.k2, x.k4)) / x.scale
                ELSE (x.kb + coalesce(x.k2, x.k4)) * -x.scale END,
           coalesce(x.r, false)
    FROM (
        SELECT p.metric_id, p.scale, p.kb, p.t0, p.tick,
               generate_series(p.t0 + ((s.lo - 1) * p.step) * interval '1 microsecond',
                               p.t0 + ((s.hi - 1) * p.step) * interval '1 microsecond',
                               p.step * interval '1 microsecond') AS g,
               unnest(p.toff[s.lo:s.hi]) AS o, unnest(p.ts[s.lo:s.hi]) AS ts,
               unnest(p.k2[s.lo:s.hi]) AS k2, unnest(p.k4[s.lo:s.hi]) AS k4,
               unnest(p.v[s.lo:s.hi]) AS v, unnest(p.received[s.lo:s.hi]) AS r
        FROM {schema}.numeric_packed p
        CROSS JOIN LATERAL (SELECT
            CASE WHEN p.step IS NULL THEN 1
                 ELSE greatest(1, least(p.n + 1, floor(date_part('epoch',
                      greatest(since, '1000-01-01 00:00+00') - p.t0) * 1000000 / p.step)))
                 END::integer AS lo,
            CASE WHEN p.step IS NULL THEN p.n
                 ELSE greatest(0, least(p.n, ceil(date_part('epoch',
                      least(until, '9999-01-01 00:00+00') - p.t0) * 1000000 / p.step) + 1))
                 END::integer AS hi
            OFFSET 0) s
        WHERE (p.metric_id = metric OR metric IS NULL)
          AND p.bucket > greatest(since, '1000-01-02 00:00+00') - interval '1 day'
          AND p.bucket < least(until, '9999-01-01 00:00+00')
          AND p.t1 >= since
    ) y
    CROSS JOIN LATERAL (SELECT y.*, coalesce(y.g, y.ts,
        y.t0 + (y.o::bigint * y.tick) * interval '1 microsecond') AS t) x
    WHERE x.t >= since AND x.t < until
    UNION ALL
    SELECT h.time, h.metric_id, h.value, h.received FROM {schema}.numeric_values h
    WHERE (h.metric_id = metric OR metric IS NULL)
      AND h.time >= greatest(since, '1000-01-01 00:00+00')
      AND h.time < least(until, '9999-01-01 00:00+00')
      AND NOT EXISTS (
          SELECT 1 FROM {schema}.numeric_packed q
          WHERE q.metric_id = h.metric_id
            AND q.bucket > greatest(since, '1000-01-02 00:00+00') - interval '1 day'
            AND q.bucket < least(until, '9999-01-01 00:00+00')
            AND q.bucket <= h.time AND q.t0 <= h.time AND q.t1 >= h.time
            AND CASE WHEN q.step IS NOT NULL
                     THEN mod((extract(epoch FROM h.time - q.t0) * 1000000)::bigint,
                              q.step) = 0
                     WHEN q.toff IS NOT NULL
                     THEN mod((extract(epoch FROM h.time - q.t0) * 1000000)::bigint,
                              q.tick) = 0
                          AND ((extract(epoch FROM h.time - q.t0) * 1000000)::bigint
                               / q.tick)::integer = ANY (q.toff)
                     ELSE h.time = ANY (q.ts) END)
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
