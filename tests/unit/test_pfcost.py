"""``lighten_tracing``: promptflow's span enrichers do nothing for a span that records nothing,
and everything for one that records (an OTLP endpoint set)."""

from __future__ import annotations

import sys
import types

import pytest

from flowsession.worker.pfcost import lighten_tracing


class Span:
    def __init__(self, recording: bool):
        self.recording, self.attributes = recording, {}

    def is_recording(self) -> bool:
        return self.recording


@pytest.fixture
def trace_module(monkeypatch):
    """A stand-in for promptflow.tracing._trace with two of its enrichers."""
    mod = types.ModuleType("promptflow.tracing._trace")
    calls = []

    def enrich_span_with_input(span, input):
        calls.append("input")
        span.attributes["inputs"] = repr(input)
        return input

    def enrich_span_with_output(span, output):
        calls.append("output")
        span.attributes["output"] = repr(output)

    mod.enrich_span_with_input, mod.enrich_span_with_output = (enrich_span_with_input,
                                                              enrich_span_with_output)
    pkg, tracing = types.ModuleType("promptflow"), types.ModuleType("promptflow.tracing")
    pkg.tracing, tracing._trace = tracing, mod
    for name, m in (("promptflow", pkg), ("promptflow.tracing", tracing),
                    ("promptflow.tracing._trace", mod)):
        monkeypatch.setitem(sys.modules, name, m)
    return mod, calls


def test_unrecorded_spans_skip_serialization_recorded_ones_keep_it(trace_module) -> None:
    mod, calls = trace_module
    assert lighten_tracing() is True
    assert lighten_tracing() is False  # once only
    quiet, loud = Span(False), Span(True)
    assert mod.enrich_span_with_input(quiet, {"q": 1}) == {"q": 1}  # the input goes on
    assert mod.enrich_span_with_output(quiet, "a") is None
    assert calls == [] and quiet.attributes == {}
    assert mod.enrich_span_with_input(loud, {"q": 1}) == {"q": 1}
    mod.enrich_span_with_output(loud, "a")
    assert calls == ["input", "output"] and set(loud.attributes) == {"inputs", "output"}


def test_without_promptflow_nothing_is_done(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "promptflow", None)
    assert lighten_tracing() is False
