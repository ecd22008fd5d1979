"""The embedded amqtt broker with certificate identity and per-device ACLs; Mosquitto rendering."""
