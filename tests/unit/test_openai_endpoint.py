"""The OpenAI-compatible test endpoint (tests/helpers/openai_endpoint.py), exercised with the
stdlib and httpx (no openai package here): in a thread, and as the process benchmarks start."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest
from helpers import openai_endpoint
from helpers.openai_endpoint import OpenAIEndpoint, reply_for, split_reply

KEY = "sk-test-key"


@pytest.fixture
def server():
    with OpenAIEndpoint(api_key=KEY) as srv:
        yield srv


def call(url: str, body=None, *, key: str | None = KEY, method: str | None = None,
         headers: dict | None = None, raw: bytes | None = None):
    """(status, headers, body bytes) of one request."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"))
    req.add_header("Content-Type", "application/json")
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def chat_body(content, **extra):
    return {"model": "gpt-4o-mini", "temperature": 0,
            "messages": [{"role": "system", "content": "You are terse."},
                         {"role": "user", "content": content}], **extra}


def sse_events(payload: bytes) -> list:
    events = []
    for block in payload.decode().split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_chat_completion_echoes_last_user_message(server):
    status, headers, body = call(server.base_url + "/chat/completions", chat_body("What is 2+2?"))
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    reply = json.loads(body)
    assert reply["object"] == "chat.completion"
    assert reply["id"].startswith("chatcmpl-")
    assert isinstance(reply["created"], int)
    assert reply["model"] == "gpt-4o-mini"
    choice = reply["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "echo: What is 2+2?",
                                 "refusal": None}
    assert choice["finish_reason"] == "stop"
    usage = reply["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


def test_chat_content_parts_are_joined_and_last_user_wins(server):
    body = {"model": "m", "messages": [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "echo: first question"},
        {"role": "user", "content": [{"type": "text", "text": "second "},
                                     {"type": "image_url", "image_url": {"url": "x"}},
                                     {"type": "text", "text": "question"}]}]}
    _, _, raw = call(server.base_url + "/chat/completions", body)
    assert json.loads(raw)["choices"][0]["message"]["content"] == "echo: second question"


def test_stream_chunks_assemble_to_the_full_reply(server):
    status, headers, raw = call(server.base_url + "/chat/completions",
                                chat_body("stream this answer", stream=True,
                                          stream_options={"include_usage": True}))
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    with_choices = [c for c in chunks if c["choices"]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in with_choices)
    assert text == "echo: stream this answer" == reply_for("stream this answer")
    assert len([c for c in with_choices if c["choices"][0]["delta"].get("content")]) >= 2
    assert with_choices[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in with_choices[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_split_reply_keeps_all_text():
    assert "".join(split_reply("echo: abcdefghij")) == "echo: abcdefghij"
    assert len(split_reply("echo: abcdefghij")) == 3
    assert split_reply("") == [""]


def test_completions_plain_and_streamed(server):
    status, _, raw = call(server.base_url + "/completions",
                          {"model": "gpt-3.5-turbo-instruct", "prompt": "Say hi"})
    assert status == 200
    reply = json.loads(raw)
    assert reply["object"] == "text_completion"
    assert reply["model"] == "gpt-3.5-turbo-instruct"
    assert reply["choices"][0]["text"] == "echo: Say hi"
    assert reply["choices"][0]["finish_reason"] == "stop"

    _, _, raw = call(server.base_url + "/completions",
                     {"model": "x", "prompt": "Say hi", "stream": True})
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "echo: Say hi"


def test_azure_route_with_api_key_header(server):
    url = server.url + "/openai/deployments/my-deploy/chat/completions?api-version=2024-02-01"
    status, _, raw = call(url, {"messages": [{"role": "user", "content": "azure"}]}, key=None,
                          headers={"api-key": KEY})
    assert status == 200
    reply = json.loads(raw)
    assert reply["model"] == "my-deploy"
    assert reply["choices"][0]["message"]["content"] == "echo: azure"
    assert server.requests[-1]["path"] == "/openai/deployments/my-deploy/chat/completions"
    assert server.requests[-1]["query"] == {"api-version": "2024-02-01"}
    assert server.requests[-1]["api_key"] == KEY

    status, _, _ = call(url, {"messages": [{"role": "user", "content": "x"}]}, key=None,
                        headers={"api-key": "wrong"})
    assert status == 401


def test_models_list(server):
    status, _, raw = call(server.base_url + "/models")
    assert status == 200
    listing = json.loads(raw)
    assert listing["object"] == "list"
    assert "gpt-4o-mini" in [m["id"] for m in listing["data"]]


@pytest.mark.parametrize("key", ["sk-wrong-key", None])
def test_wrong_or_missing_key_is_401(server, key):
    status, _, raw = call(server.base_url + "/chat/completions", chat_body("hi"), key=key)
    assert status == 401
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    if key:
        assert error["code"] == "invalid_api_key"
        assert key not in error["message"]  # only a masked form is shown


def test_unknown_path_is_404_and_bad_json_is_400(server):
    status, _, raw = call(server.base_url + "/nope", {"x": 1})
    assert status == 404
    assert "error" in json.loads(raw)
    status, _, raw = call(server.base_url + "/chat/completions", raw=b"{not json")
    assert status == 400
    assert json.loads(raw)["error"]["type"] == "invalid_request_error"
    status, _, _ = call(server.base_url + "/chat/completions", {"model": "m"})
    assert status == 400  # no messages


def test_fail_markers(server):
    status, headers, raw = call(server.base_url + "/chat/completions", chat_body("x FAIL_500 y"))
    assert status == 500
    assert json.loads(raw)["error"]["type"] == "server_error"
    assert headers.get("retry-after") is None
    status, _, _ = call(server.base_url + "/completions", {"model": "m", "prompt": "FAIL_400"})
    assert status == 400


def test_retry_after_header_on_500():
    with OpenAIEndpoint(retry_after=0) as srv:
        _, headers, _ = call(srv.base_url + "/chat/completions", chat_body("FAIL_500"))
        assert headers["retry-after"] == "0"


def test_slow_marker_and_latency():
    with OpenAIEndpoint(latency=0.2) as srv:
        start = time.monotonic()
        _, _, raw = call(srv.base_url + "/chat/completions", chat_body("SLOW:0.3 then answer"))
        assert time.monotonic() - start >= 0.5
        assert json.loads(raw)["choices"][0]["message"]["content"] == "echo: SLOW:0.3 then answer"


def test_requests_are_recorded(server):
    call(server.base_url + "/chat/completions", chat_body("one"))
    call(server.base_url + "/chat/completions", chat_body("two"), key="bad")
    assert [r["path"] for r in server.requests] == ["/v1/chat/completions"] * 2
    first, second = server.requests
    assert first["method"] == "POST"
    assert first["body"]["messages"][-1]["content"] == "one"
    assert first["authorization"] == f"Bearer {KEY}"
    assert second["authorization"] == "Bearer bad"
    server.clear()
    assert server.requests == []


def test_concurrent_requests_are_all_recorded(server):
    n = 10
    results: list[str] = []
    lock = threading.Lock()

    def worker(i):
        _, _, raw = call(server.base_url + "/chat/completions", chat_body(f"q{i} SLOW:0.5"))
        with lock:
            results.append(json.loads(raw)["choices"][0]["message"]["content"])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == sorted(f"echo: q{i} SLOW:0.5" for i in range(n))
    assert len(server.requests) == n
    assert server.stats()["most_in_flight"] > 1  # served side by side, not one by one


def test_start_stop_and_base_url():
    srv = OpenAIEndpoint()
    with pytest.raises(RuntimeError):
        _ = srv.base_url
    srv.start()
    try:
        assert srv.base_url.startswith("http://127.0.0.1:") and srv.base_url.endswith("/v1")
        assert call(srv.base_url + "/models")[0] == 200
        conns = srv.connections()
        assert conns["open_ai_connection"]["value"] == {"api_key": "sk-test-key",
                                                        "base_url": srv.base_url}
    finally:
        srv.stop()
    srv.stop()  # idempotent
    assert srv.connection_yaml("c") == (f'name: c\ntype: open_ai\napi_key: "sk-test-key"\n'
                                        f'base_url: "{srv.base_url}"\n')


def test_stats_count_answers_and_the_stats_route(server):
    assert server.stats() == {"requests": 0, "answered": 0, "rate_limited": 0, "first": None,
                              "last": None, "most_in_flight": 0}
    call(server.base_url + "/chat/completions", chat_body("one"))
    call(server.base_url + "/completions", {"model": "m", "prompt": "two"})
    call(server.base_url + "/chat/completions", chat_body("FAIL_400"))
    call(server.base_url + "/models")
    stats = server.stats()
    assert (stats["requests"], stats["answered"], stats["rate_limited"]) == (3, 2, 0)
    assert stats["first"] <= stats["last"] and stats["most_in_flight"] == 1
    status, _, raw = call(server.url + "/stats", key=None)
    assert status == 200 and json.loads(raw) == stats
    assert [r["path"] for r in server.requests][-1] == "/v1/models"  # /stats is not recorded


def test_over_the_rate_answers_429_saying_when_to_retry():
    with OpenAIEndpoint(rate=0.1) as srv:  # one answer now, the next in 10 s
        assert call(srv.base_url + "/chat/completions", chat_body("first"))[0] == 200
        status, headers, raw = call(srv.base_url + "/chat/completions", chat_body("second"))
        assert status == 429
        assert json.loads(raw)["error"]["code"] == "rate_limit_exceeded"
        assert 0 < float(headers["retry-after"]) <= 10
        assert 0 < int(headers["retry-after-ms"]) <= 10001
        stats = srv.stats()
        assert (stats["requests"], stats["answered"], stats["rate_limited"]) == (2, 1, 1)


def test_always_429():
    with OpenAIEndpoint(always_429=True) as srv:
        for _ in range(3):
            status, headers, _ = call(srv.base_url + "/chat/completions", chat_body("x"))
            assert (status, headers["retry-after"], headers["retry-after-ms"]) == \
                (429, "1.000", "1001")
        assert srv.stats()["rate_limited"] == 3 and srv.stats()["answered"] == 0


def test_hang_is_never_answered_and_stop_still_returns():
    srv = OpenAIEndpoint().start()
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.base_url + "/chat/completions", json=chat_body("please HANG"),
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=1)
        assert srv.in_flight == 1 and srv.stats()["answered"] == 0
        assert call(srv.base_url + "/chat/completions", chat_body("other"))[0] == 200
    finally:
        srv.stop()


def test_many_requests_in_flight_at_once():
    """Hundreds of requests wait on their answers together (HANG: until the server stops)."""
    n = 500

    async def burst(base_url):
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(limits=limits, timeout=120) as client:
            return await asyncio.gather(*(client.post(
                base_url + "/chat/completions", json=chat_body(f"q{i} HANG"),
                headers={"Authorization": f"Bearer {KEY}"}) for i in range(n)),
                return_exceptions=True)

    srv = OpenAIEndpoint(record=False).start()
    clients = threading.Thread(target=asyncio.run, args=(burst(srv.base_url),), daemon=True)
    clients.start()
    try:
        deadline = time.monotonic() + 100
        while srv.in_flight < n and time.monotonic() < deadline:
            time.sleep(0.1)
        assert srv.in_flight == srv.stats()["most_in_flight"] == srv.stats()["requests"] == n
        assert call(srv.base_url + "/chat/completions", chat_body("still here"))[0] == 200
        assert srv.requests == []  # record=False
    finally:
        srv.stop()
        clients.join(timeout=30)
    assert not clients.is_alive()  # stopping the server ended the hanging requests


def test_as_a_process_it_prints_its_port_and_serves_stats():
    proc = subprocess.Popen([sys.executable, str(Path(openai_endpoint.__file__)),
                             "--latency", "0", "--rate", "1000"], stdout=subprocess.PIPE,
                            text=True)
    try:
        port = int(proc.stdout.readline())
        base = f"http://127.0.0.1:{port}"
        status, _, raw = call(base + "/v1/chat/completions", chat_body("from a process"))
        assert status == 200
        assert json.loads(raw)["choices"][0]["message"]["content"] == "echo: from a process"
        stats = json.loads(call(base + "/stats", key=None)[2])
        assert (stats["requests"], stats["answered"]) == (1, 1)
    finally:
        proc.kill()
        proc.wait()
