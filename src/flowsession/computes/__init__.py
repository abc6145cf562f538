"""Computes: where sessions run. Serverless (made on demand) and instances (owned, started and
stopped by their owner)."""
