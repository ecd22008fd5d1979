"""Subscribe, validate, enrich, batch and write telemetry to TimescaleDB; storage migrations."""
