"""A line's result as the session sends it: the flow's outputs as one JSON object, or a
failure with the exception's type and message. Stdlib only.

The outputs follow prompt flow (``convert_eager_flow_output_to_dict`` and the script
executor's generator handling): a flex flow's entry that returns a dict gives those outputs, a
dataclass gives its fields, anything else (a string, a number, a list, None, a generator)
gives ``{"output": value}``; a generator is consumed and its items joined as text.
Nothing here may raise: whatever a flow returns, its line gets a record.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import types
from collections.abc import Callable
from typing import Any

DEFAULT_OUTPUT = "output"  # prompt flow's DEFAULT_OUTPUT_NAME
LINE_NUMBER = "line_number"  # added by promptflow to a dict output when the line has an index


def media_encoder(flow_yaml: Any, flow_dir: Any) -> Callable[[Any], Any]:
    """Images in outputs (promptflow's ``Image``) as prompt flow writes them inline, in the
    flow's message format: ``{"data:image/png;base64": ...}``, or for ``openai-vision``
    ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``. (``pf``
    saves them as files beside its outputs and refers to them by path; a session's files
    do not leave it, so its images travel inline.) Identity if promptflow has no such API."""
    try:
        from promptflow._utils.multimedia_utils import MultimediaProcessor

        processor = MultimediaProcessor.create_from_yaml(flow_yaml, flow_dir)
        convert = processor.convert_multimedia_data_to_base64_dict
    except Exception:  # noqa: BLE001 - another promptflow: images go as text
        return lambda value: value

    def encode(value: Any) -> Any:
        try:
            return convert(value)
        except Exception:  # noqa: BLE001 - left to plain()
            return value

    return encode


def flow_outputs(value: Any, index: int | None, declared: set[str],
                 media: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """The outputs of a completed line from ``LineResult.output``; ``media``: how images are
    written (``media_encoder``)."""
    if isinstance(value, dict):
        out = dict(value)
        if LINE_NUMBER not in declared and index is not None and out.get(LINE_NUMBER) == index:
            out.pop(LINE_NUMBER)  # promptflow's bookkeeping, not a flow output
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    else:
        out = {DEFAULT_OUTPUT: value}
    if media is not None:
        out = {k: media(v) for k, v in out.items()}
    return {str(k): plain(v) for k, v in out.items()}


def plain(value: Any) -> Any:
    """A value JSON can carry, as far as it can be made one: generators and iterators are
    consumed and joined as text (as prompt flow stringifies them), dataclasses become their
    fields; the rest is left for the encoder (``str(value)`` where JSON has no form)."""
    if isinstance(value, (str, bytes, bytearray, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (types.GeneratorType, collections.abc.Iterator)):
        return "".join(str(v) for v in value)
    return value


def describe(exc: BaseException) -> str:
    """``(Type) message``; promptflow's own errors as promptflow words them (``Execution
    failure in 'node': (ValueError) ...``)."""
    try:
        message = getattr(exc, "message", None)
        if not isinstance(message, str) or not message:
            message = str(exc)
        inner = getattr(exc, "inner_exception", None) or exc.__cause__
        if inner is not None and str(inner) and str(inner) not in message:
            message = f"{message.rstrip('.')}: ({type(inner).__name__}) {inner}"
        name = type(exc).__name__
        if isinstance(getattr(exc, "message", None), str) or f"({name})" in message:
            return message  # promptflow's own error: its message says what failed, and how
        return f"({name}) {message}" if message else f"({name})"
    except BaseException:  # noqa: BLE001 - a __str__ that raises: the type alone
        return f"({type(exc).__name__}) <the exception's message could not be read>"
