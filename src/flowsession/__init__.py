"""flowsession: self-hosted compute sessions for prompt flow."""

__version__ = "0.1.0"
