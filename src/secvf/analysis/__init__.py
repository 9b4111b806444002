"""Malware detonation without a control channel: clean state, sample medium, observation,
disk diff, report."""
