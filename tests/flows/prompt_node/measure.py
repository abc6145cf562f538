from promptflow.core import tool


@tool
def measure(rendered: str) -> dict:
    return {"length": len(rendered), "shout": rendered.upper()}
