from promptflow.core import tool


@tool
def say(name: str, greeting: str, mark: str = None) -> str:
    return f"{greeting} {name}{mark or '.'}"
