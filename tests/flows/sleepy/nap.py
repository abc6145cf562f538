import time

from promptflow.core import tool


@tool
def nap(seconds: str) -> str:
    time.sleep(float(seconds))
    return seconds
