-- order-free seq gap counting (ingest_worker/sequence.py): the numbers committed beyond the
-- contiguous `seq` (bit i = seq + 1 + i), and since when the holes below seq_hole_mark are open
ALTER TABLE {schema}.devices ADD COLUMN IF NOT EXISTS seq_ahead bytea;
ALTER TABLE {schema}.devices ADD COLUMN IF NOT EXISTS seq_hole_at timestamptz;
ALTER TABLE {schema}.devices ADD COLUMN IF NOT EXISTS seq_hole_mark bigint;
