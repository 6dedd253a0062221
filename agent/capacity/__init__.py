"""Capacity: the PBX's own channel limits, read from its config files."""
