"""A flex flow whose entry returns (or raises, or dies of) what its input asks for."""

import os
import sys
from dataclasses import dataclass


@dataclass
class Reply:
    text: str
    length: int


def _words(text):
    yield from text.split()


def run(kind: str, text: str = "a b c"):
    if kind == "dict":
        return {"text": text, "n": 1}
    if kind == "dataclass":
        return Reply(text, len(text))
    if kind == "str":
        return text
    if kind == "int":
        return 42
    if kind == "list":
        return [1, "two"]
    if kind == "none":
        return None
    if kind == "generator":
        return _words(text)
    if kind == "raise":
        raise ValueError(f"bad {text}")
    if kind == "exit":
        sys.exit(3)
    if kind == "die":
        os._exit(7)
    raise KeyError(kind)
