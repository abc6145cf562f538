"""Token counts without paying for spans nobody records (issue 11).

A worker turns promptflow's tracing on for flows that call LLMs: the executor counts a line's
tokens from its in-memory ``Tracer`` (the api calls of each node). But each traced call also
serializes its inputs, prompt variables and output to JSON for its OpenTelemetry span, and in a
worker no tracer provider is set (no OTLP endpoint), so the span is a non-recording one that
drops what it is given. ``lighten_tracing()`` makes those span enrichers return at once for a
span that is not recording; a recording span (an OTLP endpoint set in the run's environment)
gets them as before. Only promptflow's module attributes change; on a promptflow without them
nothing is done.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

log = logging.getLogger("flowsession.worker")

# promptflow.tracing._trace's enrichers whose work goes only into the span (first argument)
_SPAN_ONLY = ("enrich_span_with_input", "enrich_span_with_output", "enrich_span_with_trace",
              "enrich_span_with_prompt_info", "enrich_span_with_embedding",
              "enrich_span_with_llm", "enrich_span_with_context",
              "enrich_span_with_trace_type", "enrich_span_with_llm_output")


def lighten_tracing() -> bool:
    """Skip span serialization for non-recording spans; True when promptflow was patched."""
    try:
        from promptflow.tracing import _trace
    except ImportError:
        return False
    patched = False
    for name in _SPAN_ONLY:
        original = getattr(_trace, name, None)
        if original is None or getattr(original, "_flowsession_light", False):
            continue
        setattr(_trace, name, _skip_unrecorded(original, returns_second=name ==
                                               "enrich_span_with_input"))
        patched = True
    if patched:
        log.info("promptflow tracing: span enrichment skipped for non-recording spans")
    return patched


def _skip_unrecorded(original: Any, *, returns_second: bool) -> Any:
    @functools.wraps(original)
    def enrich(span: Any, *args: Any, **kwargs: Any) -> Any:
        recording = getattr(span, "is_recording", None)
        if recording is not None and not recording():
            # enrich_span_with_input returns its input; the others return None
            return (args[0] if args else kwargs.get("input")) if returns_second else None
        return original(span, *args, **kwargs)

    enrich._flowsession_light = True  # type: ignore[attr-defined]
    return enrich
