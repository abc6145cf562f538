"""The REST API (FastAPI): the only place errors become HTTP. ``create_app(settings)``."""
