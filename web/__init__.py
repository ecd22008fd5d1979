"""`fieldline web`: the HTTP API and console over the fleet's database and broker."""
