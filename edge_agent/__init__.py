"""The gateway runtime: modules, routes, windowed rules and a durable outbox (edge issue)."""
