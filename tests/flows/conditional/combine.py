from promptflow.core import tool


@tool
def combine(a: str = None, b: str = None) -> str:
    if a is not None:
        return f"a:{a}"
    if b is not None:
        return f"b:{b}"
    return "none"
