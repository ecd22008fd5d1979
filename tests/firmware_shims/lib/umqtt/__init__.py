"""umqtt for the firmware under CPython (only `umqtt.simple` is provided)."""
