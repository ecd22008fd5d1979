"""The embedded amqtt broker with certificate identity and per-device ACLs (arrives with the broker issue)."""
