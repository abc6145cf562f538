"""Batch runs: a flow run over the lines of a data file and/or an earlier run."""
