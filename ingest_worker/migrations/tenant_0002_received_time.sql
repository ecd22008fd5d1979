-- true when the device sent no `ts` and the worker stamped the value with its receive time
ALTER TABLE {schema}.numeric_values ADD COLUMN IF NOT EXISTS received boolean NOT NULL DEFAULT false;
ALTER TABLE {schema}.text_values ADD COLUMN IF NOT EXISTS received boolean NOT NULL DEFAULT false;
-- the last sequence number seen per device, for gap counting across workers and restarts
ALTER TABLE {schema}.devices ADD COLUMN IF NOT EXISTS seq bigint;
ALTER TABLE {schema}.devices ADD COLUMN IF NOT EXISTS seq_gaps bigint NOT NULL DEFAULT 0;
