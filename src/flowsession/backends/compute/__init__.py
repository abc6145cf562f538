"""Compute backends: where sessions run."""
