"""fieldline: certs."""
