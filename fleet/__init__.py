"""The fleet's data as the CLI and the web API read it: devices, series, events, commands.

Below `fieldline/` and `web/`, above `ingest_worker/` (whose schema it reads). Every read of
`numeric_values` lives in `fleet/series.py`.
"""
