-- when the worker received the answer that is a command's result: with two writers (or two
-- workers) a later answer's batch can commit first, so the earliest received answer wins by
-- this time, not by commit order
ALTER TABLE {schema}.commands ADD COLUMN IF NOT EXISTS answered_at timestamptz;
