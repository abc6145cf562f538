import humanize  # from the flow's requirements.txt: the image does not have it
from promptflow.core import tool


@tool
def hello(name: str) -> str:
    return f"Hello, {name}! You are the {humanize.ordinal(len(name))} of your kind."
