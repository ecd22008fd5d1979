"""Sensor models, devices and fleets (arrives with the simulator issue)."""
