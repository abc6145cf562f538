class Counter:
    """A flex class flow with __aggregate__: the run's metrics from its completed lines."""

    def __call__(self, text: str) -> dict:
        if text == "fail":
            raise ValueError("asked to fail")
        return {"n": len(text)}

    def __aggregate__(self, results: list) -> dict:
        # each result is a line's output: a dict read as attributes too, as pf gives it
        return {"lines": len(results), "total": sum(r.n for r in results)}
