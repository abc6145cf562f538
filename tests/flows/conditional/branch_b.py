from promptflow.core import tool


@tool
def reverse(text: str) -> str:
    return text[::-1]
