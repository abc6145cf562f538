def echo(text: str) -> str:
    """Return the input unchanged."""
    return text
