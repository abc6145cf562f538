"""An OpenAI-compatible chat endpoint for tests and benchmarks of LLM-bound runs (starlette on
uvicorn, asyncio: thousands of requests in flight cost it little), on 127.0.0.1.

``POST /v1/chat/completions`` answers ``"echo: " + <last user message>`` after ``latency``
seconds, with ``usage`` (prompt tokens: the words of the messages; completion tokens: the
words of the reply). ``rate``: at most that many answers per second (a token bucket holding
``burst`` answers); a request over it gets 429 with ``retry-after-ms`` / ``retry-after`` saying
when the next answer is free. ``always_429``: every request gets 429 (``retry-after: 1``).
A message containing ``HANG`` is never answered.

In-process (a thread)::

    with LLMServer(latency=0.1, rate=50) as server:
        server.base_url   # http://127.0.0.1:PORT/v1
        server.stats()    # {"requests", "answered", "rate_limited", "first", "last"}

As a process (benchmarks): ``python tests/helpers/llm_server.py --latency 0.1 --rate 50``
prints ``PORT`` on its first line, then serves until killed; ``GET /stats`` gives the stats.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import threading
import time
import uuid
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


class LLMServer:
    def __init__(self, *, latency: float = 0.1, rate: float | None = None,
                 burst: float | None = None, always_429: bool = False):
        self.latency, self.rate, self.always_429 = latency, rate, always_429
        self.burst = burst if burst is not None else (max(1.0, rate / 10) if rate else 0)
        self.tokens = self.burst
        self.refilled = time.monotonic()
        self.requests = self.answered = self.rate_limited = 0
        self.first: float | None = None
        self.last: float | None = None
        self.in_flight = self.most_in_flight = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/stats", self.stats_route, methods=["GET"])])
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict[str, Any]:
        return {"requests": self.requests, "answered": self.answered,
                "rate_limited": self.rate_limited, "first": self.first, "last": self.last,
                "most_in_flight": self.most_in_flight}

    async def stats_route(self, request: Request) -> JSONResponse:
        return JSONResponse(self.stats())

    def _take(self) -> float:
        """0 when an answer is free now (one taken), else seconds until one is."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate

    async def chat(self, request: Request) -> JSONResponse:
        self.requests += 1
        body = await request.json()
        messages = body.get("messages") or []
        text = next((m.get("content") for m in reversed(messages)
                     if isinstance(m, dict) and m.get("role") == "user"), "") or ""
        if not isinstance(text, str):
            text = str(text)
        if self.always_429 or (self.rate and (wait := self._take()) > 0):
            self.rate_limited += 1
            wait = 1.0 if self.always_429 else wait
            return JSONResponse(
                {"error": {"message": "Rate limit reached: retry later", "type": "requests",
                           "param": None, "code": "rate_limit_exceeded"}}, status_code=429,
                headers={"retry-after-ms": str(int(wait * 1000) + 1),
                         "retry-after": f"{max(wait, 0.001):.3f}"})
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if "HANG" in text:
                await asyncio.sleep(3600)
            await asyncio.sleep(self.latency)
        finally:
            self.in_flight -= 1
        reply = "echo: " + text
        prompt = sum(len(str(m.get("content", "")).split()) for m in messages
                     if isinstance(m, dict))
        completion = len(reply.split())
        now = time.time()
        self.answered += 1
        self.first = self.first or now
        self.last = now
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion",
            "created": int(now), "model": body.get("model") or "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion}})

    def connection_yaml(self, name: str = "open_ai_connection") -> str:
        return (f"name: {name}\ntype: open_ai\napi_key: \"sk-test-key\"\n"
                f"base_url: \"{self.base_url}\"\n")

    # --- serving ---------------------------------------------------------------------------

    def _config(self) -> uvicorn.Config:
        return uvicorn.Config(self.app, log_level="warning", access_log=False,
                              backlog=4096, timeout_keep_alive=30)

    def start(self) -> LLMServer:
        self._server = uvicorn.Server(self._config())
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self.sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sock.close()

    def __enter__(self) -> LLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--rate", type=float, default=None)
    parser.add_argument("--always-429", action="store_true")
    args = parser.parse_args()
    server = LLMServer(latency=args.latency, rate=args.rate, always_429=args.always_429)
    print(server.port, flush=True)
    uvicorn.Server(server._config()).run(sockets=[server.sock])


if __name__ == "__main__":
    sys.exit(main())
