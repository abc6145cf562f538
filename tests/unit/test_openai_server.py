"""The OpenAI-compatible test server, exercised with the stdlib only (no openai package here)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from helpers.openai_server import OpenAIServer, reply_for, split_reply

KEY = "sk-test-key"


@pytest.fixture
def server():
    with OpenAIServer(api_key=KEY) as srv:
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
    with OpenAIServer(retry_after=0) as srv:
        _, headers, _ = call(srv.base_url + "/chat/completions", chat_body("FAIL_500"))
        assert headers["retry-after"] == "0"


def test_slow_marker_and_delay():
    with OpenAIServer(delay=0.2) as srv:
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
        _, _, raw = call(server.base_url + "/chat/completions", chat_body(f"q{i} SLOW:0.2"))
        with lock:
            results.append(json.loads(raw)["choices"][0]["message"]["content"])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - start < 0.2 * n * 0.75  # served in parallel, not one by one
    assert sorted(results) == sorted(f"echo: q{i} SLOW:0.2" for i in range(n))
    assert len(server.requests) == n


def test_start_stop_and_base_url():
    srv = OpenAIServer()
    with pytest.raises(RuntimeError):
        srv.base_url
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
