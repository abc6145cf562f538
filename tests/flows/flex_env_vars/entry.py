import os


def run(name: str) -> str:
    return f"{os.environ.get('GREETING')} {name}"
