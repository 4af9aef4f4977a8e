"""Checks of the lens itself: backend parity and the norm-scale self-test."""
