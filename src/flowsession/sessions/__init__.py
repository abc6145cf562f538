"""Sessions: one flow's running environment on one compute."""
