"""promptflow's per-line costs that change nothing a line does (issue 11).

An LLM-bound line spends most of its CPU in promptflow and openai, not in the flow: on the
``llm`` node of ``tests/flows/llm_chat`` about 8 ms a line, where a 1-vCPU session can give a
batch run 1,000 ms a second. ``lighten_batch_lines()`` takes away what a batch worker never
uses, each change behind promptflow's own name, each one a no-op on a promptflow without it:

- **Span enrichment** of non-recording spans (``lighten_tracing``). The worker turns tracing on
  for flows that call LLMs (the executor counts a line's tokens from its in-memory ``Tracer``),
  but no tracer provider is set (no OTLP endpoint), so each traced call's JSON for its span went
  to a span that drops it. A recording span (an OTLP endpoint in the run's environment) gets
  it as before.
- **Jinja templates compiled once**: promptflow-tools' ``render_jinja_template`` builds a
  ``SandboxedEnvironment`` and compiles the prompt on every call; the compiled template is
  kept per (source, options) and rendered in the same sandbox (an unsafe template still fails
  with promptflow's own error).
- **Signatures looked up once**: the tracer and the DAG manager call ``inspect.signature`` on
  the node's function for every line.
- **Node threads reused**: promptflow's node scheduler starts a thread pool for every line;
  its pool is given threads that outlive the line, each task run in a fresh context holding
  the line's context variables (as a new thread's would).
- **Token counts without a warning per line**: promptflow 1.18's metrics merge adds every
  field of openai's ``usage``, and fails (a WARNING per line, after the counts were taken) on
  its ``*_tokens_details`` (None or a dict); only numbers are added.

``quiet_node_logs()`` leaves promptflow's own progress lines (five INFO lines a line:
"Executing node ...", "Node ... completes.") out of a batch run's log unless the run's
``PF_LOGGING_LEVEL`` asks for a level; the nodes' prints, warnings and errors stay.

Measured in-process (``.venv/bin/python bench/line_cost.py --reps 5``): 7.99 ms of CPU a line
as promptflow is, 4.47 ms with all of them (each alone: 0.80x to 0.97x).
"""

from __future__ import annotations

import contextvars
import functools
import logging
import re
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

log = logging.getLogger("flowsession.worker")
PF_LEVELS = {"CRITICAL", "FATAL", "ERROR", "WARN", "WARNING", "INFO", "DEBUG", "NOTSET"}

# promptflow.tracing._trace's enrichers whose work goes only into the span (first argument)
_SPAN_ONLY = ("enrich_span_with_input", "enrich_span_with_output", "enrich_span_with_trace",
              "enrich_span_with_prompt_info", "enrich_span_with_embedding",
              "enrich_span_with_llm", "enrich_span_with_context",
              "enrich_span_with_trace_type", "enrich_span_with_llm_output")


def _mark(fn: Any) -> Any:
    fn._flowsession_light = True
    return fn


def _is_marked(obj: Any) -> bool:
    return bool(getattr(obj, "_flowsession_light", False))


def lighten_tracing() -> bool:
    """Skip span serialization for non-recording spans; True when promptflow was patched."""
    try:
        from promptflow.tracing import _trace
    except ImportError:
        return False
    patched = False
    for name in _SPAN_ONLY:
        original = getattr(_trace, name, None)
        if original is None or _is_marked(original):
            continue
        setattr(_trace, name, _skip_unrecorded(original, returns_second=name ==
                                               "enrich_span_with_input"))
        patched = True
    return patched


def _skip_unrecorded(original: Any, *, returns_second: bool) -> Any:
    @functools.wraps(original)
    def enrich(span: Any, *args: Any, **kwargs: Any) -> Any:
        recording = getattr(span, "is_recording", None)
        if recording is not None and not recording():
            # enrich_span_with_input returns its input; the others return None
            return (args[0] if args else kwargs.get("input")) if returns_second else None
        return original(span, *args, **kwargs)

    return _mark(enrich)


def lighten_batch_lines() -> list[str]:
    """Apply every change above that this promptflow has the names for; the names of those
    applied (logged once)."""
    done = [name for name, apply in (("span enrichment", lighten_tracing),
                                     ("jinja templates", compile_templates_once),
                                     ("signatures", look_up_signatures_once),
                                     ("node threads", reuse_node_threads),
                                     ("token counts", count_tokens_quietly)) if apply()]
    if done:
        log.info("promptflow per-line costs lightened: %s", ", ".join(done))
    return done


def compile_templates_once() -> bool:
    """promptflow-tools' jinja rendering with each template compiled once."""
    try:
        from promptflow.tools import common
    except ImportError:
        return False
    base = getattr(common, "SandboxedEnvironment", None)
    if base is None or _is_marked(base):
        return False

    @functools.lru_cache(maxsize=256)
    def compiled(source: str, options: tuple[Any, ...]) -> Any:
        return base(**dict(options)).from_string(source)

    class CachingSandbox(base):  # type: ignore[misc, valid-type]
        """The same sandbox; ``from_string`` of a text seen before gives the template
        compiled then (a template is immutable and renders thread-safely)."""

        def __init__(self, *args: Any, **options: Any):
            super().__init__(*args, **options)
            self._options = None if args else tuple(sorted(options.items()))

        def from_string(self, source: Any, *args: Any, **kwargs: Any) -> Any:
            if args or kwargs or self._options is None or not isinstance(source, str):
                return super().from_string(source, *args, **kwargs)
            try:
                return compiled(source, self._options)
            except TypeError:  # an option that cannot be a key
                return super().from_string(source)

    common.SandboxedEnvironment = _mark(CachingSandbox)
    return True


def look_up_signatures_once() -> bool:
    """``inspect.signature`` of a node's function, remembered, where promptflow asks per line."""
    import inspect

    modules = []
    for name in ("promptflow.tracing._tracer", "promptflow.executor._dag_manager"):
        try:
            module = __import__(name, fromlist=["inspect"])
        except ImportError:
            continue
        if getattr(module, "inspect", None) is inspect:
            modules.append(module)
    if not modules:
        return False
    signature = inspect.signature

    @functools.lru_cache(maxsize=512)
    def remembered(f: Any) -> Any:
        return signature(f)

    class Inspect:
        """``inspect`` as these modules see it: ``signature(f)`` remembered per callable."""

        def __getattr__(self, name: str) -> Any:
            return getattr(inspect, name)

        @staticmethod
        def signature(f: Any, *args: Any, **kwargs: Any) -> Any:
            if args or kwargs:
                return signature(f, *args, **kwargs)
            try:
                return remembered(f)
            except TypeError:  # not hashable
                return signature(f)

    for module in modules:
        module.inspect = Inspect()
    return True


def reuse_node_threads() -> bool:
    """promptflow's per-line node thread pool backed by one pool of threads kept for the
    worker's life (no thread started per line)."""
    try:
        from promptflow.executor import _flow_nodes_scheduler as scheduler
    except ImportError:
        return False
    if getattr(scheduler, "ThreadPoolExecutor", None) is not ThreadPoolExecutor:
        return False  # not the name this expects, or already replaced
    # no cap: a line's tasks never queue behind other lines' (a node may wait on another)
    shared = ThreadPoolExecutor(max_workers=1 << 20, thread_name_prefix="pf-node")

    class LinePool:
        """What the scheduler uses of a ThreadPoolExecutor, for one line."""

        def __init__(self, max_workers: int | None = None, thread_name_prefix: str = "",
                     initializer: Any = None, initargs: tuple[Any, ...] = ()):
            self._initializer, self._initargs = initializer, initargs

        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:
            def in_fresh_context() -> Any:  # as a new thread of the line's pool would run it
                if self._initializer is not None:
                    self._initializer(*self._initargs)
                return fn(*args, **kwargs)

            return shared.submit(contextvars.Context().run, in_fresh_context)

        def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
            pass  # the threads are the worker's; a running task ends on its own

    scheduler.ThreadPoolExecutor = _mark(LinePool)
    return True


def count_tokens_quietly() -> bool:
    """promptflow's token-count merge adding numbers only (openai's usage also holds
    ``*_tokens_details``: None or a dict)."""
    try:
        from promptflow.tracing._openai_utils import OpenAIMetricsCalculator
    except ImportError:
        return False
    original = getattr(OpenAIMetricsCalculator, "merge_metrics_dict", None)
    if original is None or _is_marked(original):
        return False

    def merge_metrics_dict(self: Any, metrics: dict, metrics_to_merge: dict) -> None:
        for key, value in metrics_to_merge.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[key] = metrics.get(key, 0) + value

    OpenAIMetricsCalculator.merge_metrics_dict = _mark(merge_metrics_dict)
    return True


# promptflow's own progress lines, several a line (flow_execution_context, the schedulers, the
# executor); a node's prints ("[node in line N] stdout> ...") and warnings are not among them
_PROGRESS = re.compile(r"(Executing node \S+\. node run id: |Node \S+ completes\.$|"
                       r"Start executing nodes in (thread pool|async) mode\.$|"
                       r"Start to run \d+ nodes with |Current thread is not main thread, |"
                       r"Timeout task is (scheduled|cancelled) )")


class _NoProgress(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and isinstance(record.msg, str)
                    and _PROGRESS.match(record.msg))


def quiet_node_logs(env: Any) -> str:
    """A batch run's log without promptflow's per-node progress lines (five INFO lines a line:
    "Executing node ...", "Node ... completes." and the like); the nodes' prints, warnings and
    errors stay. A run (or flow) setting ``PF_LOGGING_LEVEL`` gets that level and every line.
    Returns what was done: the level set, or "progress filtered"."""
    try:
        from promptflow._utils.logger_utils import flow_logger
    except ImportError:
        return "no promptflow"
    wanted = str(env.get("PF_LOGGING_LEVEL", "")).upper()
    if wanted in PF_LEVELS:
        flow_logger.setLevel(wanted)
        return wanted
    if not any(isinstance(f, _NoProgress) for f in flow_logger.filters):
        flow_logger.addFilter(_NoProgress())  # dropped before formatting: no cost but the record
    return "progress filtered"
