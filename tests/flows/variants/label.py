from promptflow.core import tool


@tool
def label(prefix: str, text: str) -> str:
    return f"{prefix}{text}"
