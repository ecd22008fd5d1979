"""fieldline: schemas."""
