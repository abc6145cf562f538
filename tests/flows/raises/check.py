from promptflow.core import tool


@tool
def check(text: str) -> str:
    if text.startswith("bad"):
        raise ValueError(f"bad input: {text}")
    return text
