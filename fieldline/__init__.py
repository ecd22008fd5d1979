"""fieldline: industrial telemetry from field devices to TimescaleDB over secure MQTT."""

__version__ = "0.1.0"
