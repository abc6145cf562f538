from typing import Iterator

from promptflow.core import tool


@tool
def stream(text: str) -> Iterator[str]:
    for word in text.split():
        yield word + " "
