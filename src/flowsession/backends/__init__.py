"""Backends: talk to the outside world; know nothing of the API or the store."""
