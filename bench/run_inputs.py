"""Benchmark: reading a run's data and resolving its inputs, the control plane's own work before
a run's lines go to the session (the figures tests/unit/test_run_inputs.py used to assert).

  load      load_data over a 100,000-line data.jsonl
  resolve   resolve_inputs of 100,000 rows through a column mapping

Best of R repetitions, per phase, and lines per second.

    .venv/bin/python bench/run_inputs.py [--lines 100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from flowsession.runs.data import DataSet, load_data  # noqa: E402
from flowsession.runs.mapping import FlowInputSpec, resolve_inputs  # noqa: E402


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lines", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.jsonl"
        path.write_text("".join(f'{{"q": "question {i}", "a": {i}}}\n' for i in range(a.lines)))
        load = best(lambda: load_data(path), a.repeat)
    rows = [{"question": f"q{i}", "truth": f"t{i}", "unused": i} for i in range(a.lines)]
    data = DataSet(path=Path("big.jsonl"), rows=rows, columns=["question", "truth", "unused"],
                   skipped=[])
    declared = [FlowInputSpec("q"), FlowInputSpec("truth", default=1)]
    resolve = best(lambda: resolve_inputs(declared, {"q": "${data.question}", "lit": "x"},
                                          data, None), a.repeat)
    for phase, took in (("load", load), ("resolve", resolve)):
        print(f"{phase:8s} {a.lines} lines: {took:.3f} s ({a.lines / took:,.0f} lines/s)")


if __name__ == "__main__":
    main()
