"""What every fieldline device runs: the MQTT link, command intake, boot counter and uplink.

The simulator's devices and the edge agent share it, so a gateway talks MQTT without the
simulator. It imports only `core`, `schemas` and `certs`.
"""
