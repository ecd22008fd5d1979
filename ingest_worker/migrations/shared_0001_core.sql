-- The shared schema: tenants, dead letters. schema_migrations is created by the runner itself.
CREATE TABLE IF NOT EXISTS fieldline.tenants (
    id            text PRIMARY KEY CHECK (id ~ '^[a-z0-9][a-z0-9_-]{0,63}$'),
    schema_name   text NOT NULL UNIQUE,
    retention_days integer CHECK (retention_days IS NULL OR retention_days > 0),
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Bad input is acknowledged and kept here with the reason, never dropped silently.
CREATE TABLE IF NOT EXISTS fieldline.dead_letters (
    time        timestamptz NOT NULL DEFAULT now(),
    topic       text NOT NULL,
    payload     bytea,
    reason      text NOT NULL,
    error       text NOT NULL,
    tenant_id   text,
    device_id   text
);
CREATE INDEX IF NOT EXISTS dead_letters_time_idx ON fieldline.dead_letters (time DESC);
CREATE INDEX IF NOT EXISTS dead_letters_reason_idx ON fieldline.dead_letters (reason, time DESC);
