from promptflow.core import tool


@tool
def grade(answer: str, expected: str) -> str:
    return "correct" if answer.strip().lower() == expected.strip().lower() else "wrong"
