"""An OpenAI-compatible endpoint on 127.0.0.1 for tests and benchmarks (starlette on uvicorn,
asyncio: thousands of requests in flight cost it little).

Replies are deterministic: the assistant says ``"echo: " + <last user message>`` (chat) or
``"echo: " + <prompt>`` (completions), with ``usage`` (prompt tokens: the words of the
messages / prompt; completion tokens: the words of the reply), so flows calling an LLM have
exact expected outputs and token counts.

Routes::

    POST /v1/chat/completions                                   Authorization: Bearer <key>
    POST /openai/deployments/<deployment>/chat/completions?api-version=...   api-key: <key>
    POST /v1/completions
    POST /openai/deployments/<deployment>/completions?api-version=...
    GET  /v1/models, GET /v1/models/<id>
    GET  /stats                                                 (no key; see ``stats()``)

``"stream": true`` answers Server-Sent Events (``data: {chunk}`` ... ``data: [DONE]``) in the
``chat.completion.chunk`` / ``text_completion`` chunk formats, the reply split into a few
chunks (``stream_options: {"include_usage": true}`` adds the final usage chunk).

Markers in the last user message (or the completion prompt):

``FAIL_500``        answer 500 (``server_error``). NB: promptflow's llm tool *retries* 5xx with
                    3, 4, 6, 10, ... 60 s back-offs (up to 100 tries) unless a ``retry-after``
                    header says otherwise: pass ``retry_after=0`` to make those retries instant.
``FAIL_400``        answer 400 (``invalid_request_error``): not retried, the line fails at once.
``SLOW:<seconds>``  sleep that long (besides ``latency``) before answering (``SLOW:0.5``).
``HANG``            never answered.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: wrong or missing
key -> 401, unknown path -> 404, unparsable JSON body -> 400. ``rate``: at most that many
answers per second (a token bucket holding ``burst`` answers); a completion request over it
gets 429 with ``retry-after-ms`` / ``retry-after`` saying when the next answer is free.
``always_429``: every completion request gets 429 (``retry-after: 1``).

In-process (a thread)::

    with OpenAIEndpoint(latency=0.1, rate=50) as server:
        client = openai.OpenAI(api_key="sk-test-key", base_url=server.base_url)
        ...
        server.requests  # [{"method", "path", "query", "body", "authorization", "api_key"}]
        server.stats()   # {"requests", "answered", "rate_limited", "first", "last",
                         #  "most_in_flight"}

As a process (benchmarks): ``python tests/helpers/openai_endpoint.py --latency 0.1 --rate 50``
prints ``PORT`` on its first line, then serves until killed; ``GET /stats`` gives the stats
(the process keeps no ``requests`` record).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import sys
import threading
import time
import uuid
from typing import Any, Self
from urllib.parse import parse_qs

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

__all__ = ["OpenAIEndpoint", "reply_for", "split_reply"]

_SLOW = re.compile(r"SLOW:(\d+(?:\.\d+)?)")
_AZURE = re.compile(r"^/openai/deployments/([^/]+)/(chat/completions|completions)$")
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]  # anything but these: 405
_MODELS = ["gpt-4o-mini", "gpt-4o", "gpt-3.5-turbo", "gpt-3.5-turbo-instruct"]
_NO_KEY = ("You didn't provide an API key. You need to provide your API key in an "
           "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
_BAD_JSON = ("We could not parse the JSON body of your request. (HINT: This likely means you "
             "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
             "but what was sent was not valid JSON.)")


def reply_for(text: str) -> str:
    """The reply the server gives for a user message / prompt."""
    return "echo: " + text


def split_reply(reply: str, parts: int = 3) -> list[str]:
    """The content pieces a streamed reply is cut into (at most *parts*, never empty pieces)."""
    if not reply:
        return [""]
    size = max(1, -(-len(reply) // parts))  # ceil
    return [reply[i:i + size] for i in range(0, len(reply), size)]


def _text_of(content) -> str:
    """A message's content: a string, or a list of parts whose text parts are joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text":
                texts.append(str(part.get("text", "")))
        return "".join(texts)
    return str(content)


def _last_user_text(messages) -> str:
    for message in reversed(messages or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return _text_of(message.get("content"))
    return ""


def _prompt_text(prompt) -> str:
    if isinstance(prompt, list):  # a batch of prompts: answer the first (as n=1 clients expect)
        return str(prompt[0]) if prompt else ""
    return "" if prompt is None else str(prompt)


def _tokens(text: str) -> int:
    return max(1, len(text.split())) if text else 0


def _usage(prompt_tokens: int, reply: str) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": _tokens(reply),
            "total_tokens": prompt_tokens + _tokens(reply)}


def _error(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _json(status: int, payload: dict, headers: dict | None = None) -> Response:
    return Response(json.dumps(payload).encode(), status_code=status,
                    media_type="application/json",
                    headers={"x-request-id": f"req_{uuid.uuid4().hex[:16]}", **(headers or {})})


def _stream(events: list[dict]) -> StreamingResponse:
    async def body():
        for event in events:
            yield f"data: {json.dumps(event)}\n\n".encode()
        yield b"data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache",
                                      "x-request-id": f"req_{uuid.uuid4().hex[:16]}"})


def _shown_key(authorization: str | None, api_key_header: str | None) -> str | None:
    key = api_key_header
    if authorization:
        key = authorization[7:] if authorization.lower().startswith("bearer ") else authorization
    if not key:
        return None
    return key if len(key) <= 8 else f"{key[:3]}*****{key[-4:]}"


class OpenAIEndpoint:
    """An OpenAI-compatible server on ``127.0.0.1:<free port>``; a context manager.

    ``api_key``: the only accepted key (``Authorization: Bearer <key>``, or the Azure-style
    ``api-key: <key>`` header; a subclass may override ``_authorized``). ``latency``: seconds
    slept before every completion answer. ``retry_after``: when set, 500 answers carry
    ``retry-after: <value>`` (promptflow's llm tool then waits that long between its retries
    instead of 3..60 s). ``rate`` / ``burst`` / ``always_429``: see the module docstring.
    ``record``: keep every request in ``requests``.
    """

    def __init__(self, *, api_key: str = "sk-test-key", latency: float = 0.0,
                 retry_after: float | None = None, rate: float | None = None,
                 burst: float | None = None, always_429: bool = False,
                 record: bool = True) -> None:
        self.api_key = api_key
        self.latency = latency
        self.retry_after = retry_after
        self.rate, self.always_429, self.record = rate, always_429, record
        self.burst = burst if burst is not None else (max(1.0, rate / 10) if rate else 0)
        self._bucket = self.burst
        self._refilled = time.monotonic()
        #: every request received (but ``GET /stats``): {"method", "path" (no query), "query"
        #: (dict), "body" (parsed JSON, or the raw text when it was not JSON, or None),
        #: "authorization" (the Authorization header or None), "api_key" (the api-key header
        #: or None)}
        self.requests: list[dict] = []
        self.completion_requests = self.answered = self.rate_limited = 0
        self.first: float | None = None
        self.last: float | None = None
        self.in_flight = self.most_in_flight = 0
        self.app = Starlette(routes=[Route("/stats", self._stats_route, methods=["GET"]),
                                     Route("/{path:path}", self._handle, methods=_METHODS)])
        self.port: int = 0
        self._sock: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # -- addresses -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (the Azure OpenAI ``azure_endpoint`` / ``api_base``)."""
        if not self.port:
            raise RuntimeError("OpenAIEndpoint is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>/v1`` (the OpenAI ``base_url``)."""
        return self.url + "/v1"

    def connections(self, name: str = "open_ai_connection") -> dict:
        """A promptflow connections dict (DictConnectionProvider format) pointing here."""
        return {name: {"type": "OpenAIConnection", "name": name,
                       "module": "promptflow.connections",
                       "value": {"api_key": self.api_key, "base_url": self.base_url}}}

    def connection_yaml(self, name: str = "open_ai_connection") -> str:
        """A connection file (``flowsession connection create --file``) pointing here."""
        return (f"name: {name}\ntype: open_ai\napi_key: \"{self.api_key}\"\n"
                f"base_url: \"{self.base_url}\"\n")

    # -- what it saw ---------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """``requests``: completion requests received; ``answered`` (200s), ``rate_limited``
        (429s); ``first`` / ``last``: time.time() of the first / last answer;
        ``most_in_flight``: the most requests waiting on their answer at once."""
        return {"requests": self.completion_requests, "answered": self.answered,
                "rate_limited": self.rate_limited, "first": self.first, "last": self.last,
                "most_in_flight": self.most_in_flight}

    def clear(self) -> None:
        self.requests.clear()

    def _authorized(self, authorization: str | None, api_key_header: str | None, *,
                    azure: bool) -> bool:
        if authorization == f"Bearer {self.api_key}":
            return True
        return azure and api_key_header == self.api_key

    def _take(self) -> float:
        """0 when an answer is free now (one taken), else seconds until one is."""
        now = time.monotonic()
        self._bucket = min(self.burst, self._bucket + (now - self._refilled) * self.rate)
        self._refilled = now
        if self._bucket >= 1:
            self._bucket -= 1
            return 0.0
        return (1 - self._bucket) / self.rate

    # -- routes --------------------------------------------------------------------------

    async def _stats_route(self, request: Request) -> Response:
        return _json(200, self.stats())

    async def _handle(self, request: Request) -> Response:
        method = request.method
        raw = await request.body()
        raw_path = request.scope["path"]
        path = raw_path.rstrip("/") or "/"
        query_string = request.scope.get("query_string", b"").decode("latin-1")
        query = {k: v[0] for k, v in parse_qs(query_string).items()} if query_string else {}
        authorization = request.headers.get("authorization")
        api_key_header = request.headers.get("api-key")
        try:
            body = json.loads(raw) if raw else None
            bad_json = False
        except (ValueError, UnicodeDecodeError):
            body, bad_json = raw.decode("utf-8", "replace"), True
        if self.record:
            self.requests.append({"method": method, "path": path, "query": query, "body": body,
                                  "authorization": authorization, "api_key": api_key_header})

        azure = _AZURE.match(path)
        if method == "POST" and path == "/v1/chat/completions":
            kind, deployment = "chat", None
        elif method == "POST" and path == "/v1/completions":
            kind, deployment = "completion", None
        elif method == "POST" and azure:
            kind = "chat" if azure.group(2) == "chat/completions" else "completion"
            deployment = azure.group(1)
        elif method == "GET" and (path == "/v1/models" or path.startswith("/v1/models/")):
            kind, deployment = "models", None
        else:
            return _json(404, _error(f"Invalid URL ({method} {raw_path})",
                                     "invalid_request_error"))
        if kind != "models":
            self.completion_requests += 1

        if not self._authorized(authorization, api_key_header, azure=bool(azure)):
            shown = _shown_key(authorization, api_key_header)
            msg = _NO_KEY if shown is None else f"Incorrect API key provided: {shown}."
            return _json(401, _error(msg, "invalid_request_error",
                                     None if shown is None else "invalid_api_key"))
        if kind == "models":
            return self._models(path)
        if bad_json:
            return _json(400, _error(_BAD_JSON, "invalid_request_error"))
        if not isinstance(body, dict):
            return _json(400, _error("The request body must be a JSON object.",
                                     "invalid_request_error"))
        if kind == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                return _json(400, _error("Missing required parameter: 'messages'.",
                                         "invalid_request_error", "missing_required_parameter",
                                         "messages"))
            text = _last_user_text(messages)
        else:
            if "prompt" not in body:
                return _json(400, _error("Missing required parameter: 'prompt'.",
                                         "invalid_request_error", "missing_required_parameter",
                                         "prompt"))
            text = _prompt_text(body.get("prompt"))

        if self.always_429 or (self.rate and (wait := self._take()) > 0):
            self.rate_limited += 1
            wait = 1.0 if self.always_429 else wait
            return _json(429, _error("Rate limit reached: retry later", "requests",
                                     "rate_limit_exceeded"),
                         {"retry-after-ms": str(int(wait * 1000) + 1),
                          "retry-after": f"{max(wait, 0.001):.3f}"})
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if "HANG" in text:
                await asyncio.sleep(3600)
            if self.latency > 0:
                await asyncio.sleep(self.latency)
            slow = _SLOW.search(text)
            if slow:
                await asyncio.sleep(float(slow.group(1)))
        finally:
            self.in_flight -= 1
        if "FAIL_500" in text:
            headers = {} if self.retry_after is None else {"retry-after": str(self.retry_after)}
            return _json(500, _error("The server had an error while processing your request. "
                                     "Sorry about that! (FAIL_500 marker)", "server_error"),
                         headers)
        if "FAIL_400" in text:
            return _json(400, _error("Invalid request (FAIL_400 marker).",
                                     "invalid_request_error"))

        now = time.time()
        self.answered += 1
        self.first = self.first or now
        self.last = now
        model = body.get("model") or deployment or ""
        if kind == "chat":
            prompt_tokens = sum(_tokens(_text_of(m.get("content"))) for m in messages
                                if isinstance(m, dict))
            return self._chat(body, model, reply_for(text), prompt_tokens)
        return self._completion(body, model, reply_for(text), _tokens(text))

    def _models(self, path: str) -> Response:
        def entry(name):
            return {"id": name, "object": "model", "created": 1700000000, "owned_by": "system"}
        if path == "/v1/models":
            return _json(200, {"object": "list", "data": [entry(m) for m in _MODELS]})
        name = path[len("/v1/models/"):]
        if name in _MODELS:
            return _json(200, entry(name))
        return _json(404, _error(f"The model '{name}' does not exist", "invalid_request_error",
                                 "model_not_found", "model"))

    def _chat(self, body: dict, model: str, reply: str, prompt_tokens: int) -> Response:
        usage = _usage(prompt_tokens, reply)
        common = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                  "model": model, "system_fingerprint": "fp_test"}
        if not body.get("stream"):
            return _json(200, {
                **common, "object": "chat.completion",
                "choices": [{"index": 0, "logprobs": None, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": reply,
                                         "refusal": None}}],
                "usage": usage})

        def chunk(delta, finish=None):
            return {**common, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                 "finish_reason": finish}]}
        events = [chunk({"role": "assistant", "content": "", "refusal": None})]
        events += [chunk({"content": piece}) for piece in split_reply(reply)]
        events.append(chunk({}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({**common, "object": "chat.completion.chunk", "choices": [],
                           "usage": usage})
        return _stream(events)

    def _completion(self, body: dict, model: str, reply: str, prompt_tokens: int) -> Response:
        usage = _usage(prompt_tokens, reply)
        common = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
                  "created": int(time.time()), "model": model, "system_fingerprint": "fp_test"}
        if not body.get("stream"):
            return _json(200, {
                **common,
                "choices": [{"text": reply, "index": 0, "logprobs": None,
                             "finish_reason": "stop"}],
                "usage": usage})
        pieces = split_reply(reply)
        events = [{**common, "choices": [{"text": piece, "index": 0, "logprobs": None,
                                          "finish_reason": "stop" if i == len(pieces) - 1
                                          else None}]}
                  for i, piece in enumerate(pieces)]
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({**common, "choices": [], "usage": usage})
        return _stream(events)

    # -- serving -------------------------------------------------------------------------

    def _bind(self) -> socket.socket:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(4096)  # connections wait in the backlog until uvicorn accepts them
        self._sock, self.port = sock, sock.getsockname()[1]
        return sock

    def _config(self) -> uvicorn.Config:
        return uvicorn.Config(self.app, log_level="warning", access_log=False, loop="asyncio",
                              lifespan="off", backlog=4096, timeout_keep_alive=30,
                              http=_NoDelayH11)

    def start(self) -> OpenAIEndpoint:
        if self._server is not None:
            return self
        sock = self._bind()
        server = self._server = uvicorn.Server(self._config())
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                                        name=f"OpenAIEndpoint:{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not server.started:
            self.stop()
            raise RuntimeError("OpenAIEndpoint did not start")
        return self

    def stop(self) -> None:
        """Stop serving now (requests still waiting on their answer are dropped); idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.should_exit = server.force_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._sock is not None:
            self._sock.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _NoDelayH11(H11Protocol):
    """uvicorn's h11 protocol with TCP_NODELAY on each connection. Connections accepted from a
    socket handed to uvicorn have Nagle's algorithm on, and h11 writes an answer's head and body
    apart: on a kept-alive connection each answer then waited ~40 ms for the client's delayed
    ACK, so a "100 ms" endpoint answered in ~145 ms (a real endpoint does not)."""

    def connection_made(self, transport: Any) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)


def main() -> None:
    parser = argparse.ArgumentParser(description="An OpenAI-compatible endpoint on 127.0.0.1: "
                                                 "prints its port, then serves until killed.")
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--rate", type=float, default=None)
    parser.add_argument("--always-429", action="store_true")
    parser.add_argument("--api-key", default="sk-test-key")
    args = parser.parse_args()
    server = OpenAIEndpoint(api_key=args.api_key, latency=args.latency, rate=args.rate,
                            always_429=args.always_429, record=False)
    sock = server._bind()
    print(server.port, flush=True)
    uvicorn.Server(server._config()).run(sockets=[sock])


if __name__ == "__main__":
    sys.exit(main())
