from promptflow.core import tool


@tool
def greet(name: str) -> str:
    # a relative path: prompt flow runs a flow in its own folder
    with open("template.txt") as f:
        return f.read().strip().format(name=name)
