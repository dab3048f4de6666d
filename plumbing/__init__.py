"""Plumbing: data, the checkpoint format, files and locks, devices, flags, the sitting clock, run logs, image I/O."""
