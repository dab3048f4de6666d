"""Scoring: the Inception-v3 network, the proxy CNN, and the FID / KID maths."""
