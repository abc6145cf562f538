import os

from promptflow.core import tool


@tool
def read(name: str) -> str:
    return f"{os.environ.get('GREETING')} {name} x{os.environ.get('TIMES')}"
