def run(text: str) -> dict:
    return {"out": text.upper()}
