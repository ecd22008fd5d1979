"""Errors of the storage and ingest layer."""


class StorageError(Exception):
    """Base: the database could not be reached, migrated or written."""
