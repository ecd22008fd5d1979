"""The gateway runtime: modules, routes, windowed rules and a durable outbox (arrives with the edge issue)."""
