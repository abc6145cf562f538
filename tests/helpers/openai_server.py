"""A small OpenAI-compatible HTTP server on 127.0.0.1 for tests (stdlib only).

Replies are deterministic: the assistant says ``"echo: " + <last user message>`` (chat) or
``"echo: " + <prompt>`` (completions), so flows calling an LLM have exact expected outputs.

Routes::

    POST /v1/chat/completions                                   Authorization: Bearer <key>
    POST /openai/deployments/<deployment>/chat/completions?api-version=...   api-key: <key>
    POST /v1/completions
    POST /openai/deployments/<deployment>/completions?api-version=...
    GET  /v1/models, GET /v1/models/<id>

``"stream": true`` answers Server-Sent Events (``data: {chunk}`` ... ``data: [DONE]``) in the
``chat.completion.chunk`` / ``text_completion`` chunk formats, the reply split into a few
chunks (``stream_options: {"include_usage": true}`` adds the final usage chunk).

Markers in the last user message (or the completion prompt):

``FAIL_500``        answer 500 (``server_error``). NB: promptflow's llm tool *retries* 5xx with
                    3, 4, 6, 10, ... 60 s back-offs (up to 100 tries) unless a ``retry-after``
                    header says otherwise: pass ``retry_after=0`` to make those retries instant.
``FAIL_400``        answer 400 (``invalid_request_error``): not retried, the line fails at once.
``SLOW:<seconds>``  sleep that long before answering (``SLOW:0.5``).

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: wrong or missing
key -> 401, unknown path -> 404, unparsable JSON body -> 400.

Usage::

    with OpenAIServer() as server:
        client = openai.OpenAI(api_key="sk-test-key", base_url=server.base_url)
        ...
        server.requests  # [{"method", "path", "query", "body", "authorization", "api_key"}]
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

__all__ = ["OpenAIServer", "reply_for", "split_reply"]

_SLOW = re.compile(r"SLOW:(\d+(?:\.\d+)?)")
_AZURE = re.compile(r"^/openai/deployments/([^/]+)/(chat/completions|completions)$")
_MODELS = ["gpt-4o-mini", "gpt-4o", "gpt-3.5-turbo", "gpt-3.5-turbo-instruct"]


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


def _error(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: "OpenAIServer"


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive, as the openai client (httpx) expects
    server_version = "openai-test-server/1.0"

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    # -- plumbing ------------------------------------------------------------------------

    def _send_json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", f"req_{uuid.uuid4().hex[:16]}")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_stream(self, events: list[dict]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for event in events:
                self._write_chunk(f"data: {json.dumps(event)}\n\n".encode())
            self._write_chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    # -- routing -------------------------------------------------------------------------

    def do_GET(self):  # noqa: N802
        self._handle("GET")

    def do_POST(self):  # noqa: N802
        self._handle("POST")

    def do_DELETE(self):  # noqa: N802
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        owner = self.server.owner
        raw = self._read_body()
        split = urlsplit(self.path)
        path = split.path.rstrip("/") or "/"
        query = {k: v[0] for k, v in parse_qs(split.query).items()}
        authorization = self.headers.get("Authorization")
        api_key_header = self.headers.get("api-key")
        try:
            body = json.loads(raw) if raw else None
            bad_json = False
        except (ValueError, UnicodeDecodeError):
            body, bad_json = raw.decode("utf-8", "replace"), True
        owner._record({"method": method, "path": path, "query": query, "body": body,
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
            return self._send_json(404, _error(f"Invalid URL ({method} {split.path})",
                                               "invalid_request_error"))

        if not owner._authorized(authorization, api_key_header, azure=bool(azure)):
            shown = _shown_key(authorization, api_key_header)
            msg = ("You didn't provide an API key. You need to provide your API key in an "
                   "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
                   if shown is None else f"Incorrect API key provided: {shown}.")
            return self._send_json(401, _error(msg, "invalid_request_error",
                                               None if shown is None else "invalid_api_key"))

        if kind == "models":
            return self._models(path)
        if bad_json:
            return self._send_json(400, _error(
                "We could not parse the JSON body of your request. (HINT: This likely means you "
                "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
                "but what was sent was not valid JSON.)", "invalid_request_error"))
        if not isinstance(body, dict):
            return self._send_json(400, _error("The request body must be a JSON object.",
                                               "invalid_request_error"))
        if kind == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                return self._send_json(400, _error(
                    "Missing required parameter: 'messages'.", "invalid_request_error",
                    "missing_required_parameter", "messages"))
            text = _last_user_text(messages)
        else:
            if "prompt" not in body:
                return self._send_json(400, _error(
                    "Missing required parameter: 'prompt'.", "invalid_request_error",
                    "missing_required_parameter", "prompt"))
            text = _prompt_text(body.get("prompt"))

        if owner.delay > 0:
            time.sleep(owner.delay)
        slow = _SLOW.search(text)
        if slow:
            time.sleep(float(slow.group(1)))
        if "FAIL_500" in text:
            headers = {} if owner.retry_after is None else {"retry-after": str(owner.retry_after)}
            return self._send_json(500, _error(
                "The server had an error while processing your request. Sorry about that! "
                "(FAIL_500 marker)", "server_error"), headers)
        if "FAIL_400" in text:
            return self._send_json(400, _error("Invalid request (FAIL_400 marker).",
                                               "invalid_request_error"))

        model = body.get("model") or deployment or ""
        if kind == "chat":
            prompt_tokens = sum(_tokens(_text_of(m.get("content"))) for m in messages
                                if isinstance(m, dict))
            self._chat(body, model, reply_for(text), prompt_tokens)
        else:
            self._completion(body, model, reply_for(text), _tokens(text))

    # -- endpoints -----------------------------------------------------------------------

    def _models(self, path: str) -> None:
        def entry(name):
            return {"id": name, "object": "model", "created": 1700000000, "owned_by": "system"}
        if path == "/v1/models":
            return self._send_json(200, {"object": "list", "data": [entry(m) for m in _MODELS]})
        name = path[len("/v1/models/"):]
        if name in _MODELS:
            return self._send_json(200, entry(name))
        return self._send_json(404, _error(f"The model '{name}' does not exist",
                                           "invalid_request_error", "model_not_found", "model"))

    def _chat(self, body: dict, model: str, reply: str, prompt_tokens: int) -> None:
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": _tokens(reply),
                 "total_tokens": prompt_tokens + _tokens(reply)}
        common = {"id": ident, "created": created, "model": model,
                  "system_fingerprint": "fp_test"}
        if not body.get("stream"):
            return self._send_json(200, {
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
        self._send_stream(events)

    def _completion(self, body: dict, model: str, reply: str, prompt_tokens: int) -> None:
        ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": _tokens(reply),
                 "total_tokens": prompt_tokens + _tokens(reply)}
        common = {"id": ident, "object": "text_completion", "created": created, "model": model,
                  "system_fingerprint": "fp_test"}
        if not body.get("stream"):
            return self._send_json(200, {
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
        self._send_stream(events)


def _shown_key(authorization: str | None, api_key_header: str | None) -> str | None:
    key = api_key_header
    if authorization:
        key = authorization[7:] if authorization.lower().startswith("bearer ") else authorization
    if not key:
        return None
    return key if len(key) <= 8 else f"{key[:3]}*****{key[-4:]}"


class OpenAIServer:
    """An OpenAI-compatible server on ``127.0.0.1:<free port>``; a context manager.

    ``api_key``: the only accepted key (``Authorization: Bearer <key>``, or the Azure-style
    ``api-key: <key>`` header). ``delay``: seconds slept before every completion answer.
    ``retry_after``: when set, 500 answers carry ``retry-after: <value>`` (promptflow's llm tool
    then waits that long between its retries instead of 3..60 s).
    """

    def __init__(self, *, api_key: str = "sk-test-key", delay: float = 0.0,
                 retry_after: float | None = None) -> None:
        self.api_key = api_key
        self.delay = delay
        self.retry_after = retry_after
        #: every request received: {"method", "path" (no query), "query" (dict), "body"
        #: (parsed JSON, or the raw text when it was not JSON, or None), "authorization"
        #: (the Authorization header or None), "api_key" (the api-key header or None)}
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int = 0

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> "OpenAIServer":
        if self._server is not None:
            return self
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name=f"OpenAIServer:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "OpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- addresses -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (the Azure OpenAI ``azure_endpoint`` / ``api_base``)."""
        if not self.port:
            raise RuntimeError("OpenAIServer is not started")
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

    # -- recording -----------------------------------------------------------------------

    def _record(self, entry: dict) -> None:
        with self._lock:
            self.requests.append(entry)

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def _authorized(self, authorization: str | None, api_key_header: str | None, *,
                    azure: bool) -> bool:
        if authorization == f"Bearer {self.api_key}":
            return True
        return azure and api_key_header == self.api_key
