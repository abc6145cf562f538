class Counter:
    def __init__(self, prefix: str):
        self.prefix = prefix

    def __call__(self, text: str) -> dict:
        return {"out": f"{self.prefix}{text}"}
