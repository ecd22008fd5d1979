-- One schema per tenant. {schema} is replaced by the quoted schema name, {tenant} by the id.
CREATE TABLE IF NOT EXISTS {schema}.devices (
    id          text PRIMARY KEY CHECK (id ~ '^[a-z0-9][a-z0-9_-]{0,63}$'),
    name        text,
    status      text NOT NULL DEFAULT 'unknown' CHECK (status IN ('unknown', 'online', 'offline')),
    last_seen   timestamptz,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    fw          text,
    boot        bigint,
    meta        jsonb NOT NULL DEFAULT '{}'::jsonb
);

CREATE TABLE IF NOT EXISTS {schema}.metrics (
    id            integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id     text NOT NULL REFERENCES {schema}.devices (id) ON DELETE CASCADE,
    name          text NOT NULL,
    unit          text,
    display_name  text,
    kind          text NOT NULL CHECK (kind IN ('numeric', 'bool', 'text')),
    UNIQUE (device_id, name)
);

-- unique (metric_id, time) makes a redelivered message a no-op (ON CONFLICT DO NOTHING)
CREATE TABLE IF NOT EXISTS {schema}.numeric_values (
    time       timestamptz NOT NULL,
    metric_id  integer NOT NULL,
    value      double precision NOT NULL,
    UNIQUE (metric_id, time)
);

CREATE TABLE IF NOT EXISTS {schema}.text_values (
    time       timestamptz NOT NULL,
    metric_id  integer NOT NULL,
    value      text NOT NULL,
    UNIQUE (metric_id, time)
);

-- (device_id, kind, time) is the event's identity, so redelivery does not duplicate it
CREATE TABLE IF NOT EXISTS {schema}.events (
    time       timestamptz NOT NULL,
    device_id  text NOT NULL,
    kind       text NOT NULL,
    severity   text NOT NULL CHECK (severity IN ('debug', 'info', 'warning', 'error', 'critical')),
    body       jsonb NOT NULL DEFAULT '{}'::jsonb,
    UNIQUE (device_id, kind, time)
);

CREATE TABLE IF NOT EXISTS {schema}.commands (
    id          uuid PRIMARY KEY,
    device_id   text NOT NULL,
    name        text NOT NULL,
    args        jsonb NOT NULL DEFAULT '{}'::jsonb,
    issued_at   timestamptz NOT NULL DEFAULT now(),
    status      text NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'sent', 'ok', 'error', 'rejected', 'expired')),
    result      jsonb,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS commands_device_idx ON {schema}.commands (device_id, issued_at DESC);
