-- A dead letter keeps a bounded prefix of its payload; these say what the whole was.
ALTER TABLE fieldline.dead_letters ADD COLUMN IF NOT EXISTS payload_size integer;
ALTER TABLE fieldline.dead_letters ADD COLUMN IF NOT EXISTS payload_sha256 bytea;
