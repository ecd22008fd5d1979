-- API tokens of `fieldline web`: a sha256 of each token is kept, never the token itself.
-- viewer and operator tokens belong to one tenant; admin tokens to none (all tenants).
CREATE TABLE IF NOT EXISTS fieldline.api_tokens (
    id          text PRIMARY KEY CHECK (id ~ '^[0-9a-f]{12}$'),
    name        text NOT NULL,
    tenant_id   text CHECK (tenant_id ~ '^[a-z0-9][a-z0-9_-]{0,63}$'),
    role        text NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    token_hash  bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    CHECK ((role = 'admin') = (tenant_id IS NULL))
);
