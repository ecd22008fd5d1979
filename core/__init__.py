"""The bottom layer every package may import: settings, logging, the error base, and the
embedded PostgreSQL cluster the CLIs find the database through. It imports no other
fieldline package but `schemas`."""
