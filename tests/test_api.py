"""The OpenAI-compatible HTTP API (dllp2p/api.py): request parsing and the JSON -> Generate mapping as
pure functions, stop strings against a plain scan, then a real `dllp2p daemon --api` on loopback with
SmolLM2: answers token for token the local engine's, streamed and whole alike, and bad requests get
their HTTP error while the daemon serves on."""

from __future__ import annotations

import http.client
import json
import re
import socket

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from dllp2p import api
from dllp2p.api import HttpError, listen_address, parse_head, to_generate
from dllp2p.generate import StopFilter
from dllp2p.wire import ChatTurn


# --- pure: the request -----------------------------------------------------------------------------------


def test_parse_head():
    method, path, headers = parse_head(b"POST /v1/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length:  12 ")
    assert (method, path, headers) == ("POST", "/v1/completions", {"host": "a", "content-length": "12"})


@pytest.mark.parametrize("head", [b"GET /\r\nHost: a", b"GET / HTTP/2\r\n", b"GET / HTTP/1.1\r\nno colon",
                                  b"GET / HTTP/1.1\r\nbad name: x", b"\x00 / HTTP/1.1"])
def test_parse_head_rejects(head):
    with pytest.raises(HttpError) as e:
        parse_head(head)
    assert e.value.status == 400


def test_listen_address_takes_port_zero():
    assert listen_address("127.0.0.1:0") == ("127.0.0.1", 0)
    assert listen_address("[::1]:7341") == ("::1", 7341)
    with pytest.raises(ValueError):
        listen_address("nowhere")


def test_chat_body_to_generate():
    g, opts = to_generate("chat", {
        "model": "anything", "messages": [{"role": "developer", "content": "Be brief."},
                                          {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                                       {"type": "text", "text": "there"}]}],
        "max_completion_tokens": 7, "temperature": 0, "top_p": 0.5, "seed": 3, "stop": "\n", "stream": True,
        "stream_options": {"include_usage": True}, "top_k": 5, "repeat_penalty": 1.1, "user": "ignored"})
    assert g.messages == (ChatTurn("system", "Be brief."), ChatTurn("user", "Hi there"))
    assert (g.steps, g.temperature, g.top_p, g.seed, g.stop, g.top_k, g.repeat_penalty) == (7, 0.0, 0.5, 3, ("\n",), 5, 1.1)
    assert (opts.kind, opts.stream, opts.include_usage) == ("chat", True, True)
    d, opts = to_generate("chat", {"messages": [{"role": "user", "content": "x"}]})
    # OpenAI's defaults where it has the field, `dllp2p run`'s where it does not
    assert (d.steps, d.temperature, d.top_p, d.top_k, d.min_p, d.repeat_penalty, d.seed, d.stop, d.ctx) == (
        api.DEFAULT_MAX_TOKENS, 1.0, 1.0, 40, 0.05, 1.0, None, (), api.DEFAULT_CTX)
    assert not opts.stream


@pytest.mark.parametrize("prompt,want", [("Once", ("Once", ())), (["Once"], ("Once", ())), ([5, 6], ("", (5, 6)))])
def test_completion_prompt_forms(prompt, want):
    g, opts = to_generate("completion", {"prompt": prompt})
    assert (g.prompt, g.tokens, g.messages, opts.kind) == (*want, (), "completion")


@pytest.mark.parametrize("kind,body,says", [
    ("chat", [], "JSON object"),
    ("chat", {}, "messages"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": [{"role": "robot", "content": "x"}]}, "role"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "n": 2}, "n must be 1"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "frequency_penalty": 0.5}, "repeat_penalty"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}, "max_tokens"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "max_tokens": True}, "max_tokens"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "stop": [""]}, "stop"),
    ("completion", {"prompt": ""}, "prompt"),
    ("completion", {"prompt": ["a", "b"]}, "prompt"),
    ("completion", {"prompt": [1, -2]}, "prompt"),
])
def test_bad_bodies_name_the_field(kind, body, says):
    with pytest.raises(HttpError) as e:
        to_generate(kind, body)
    assert e.value.status == 400 and says in e.value.message


# --- pure: stop strings ----------------------------------------------------------------------------------


def first_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The plain scan: the text before the stop string completed first (ending earliest; the longest of
    those), and whether there was one."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if end >= len(s) and text[end - len(s):end] == s]
        if starts:
            return text[: min(starts)], True
    return text, False


@settings(max_examples=300, deadline=None)
@given(text=st.text("abc", max_size=30), stops=st.lists(st.text("abc", min_size=1, max_size=4), min_size=1, max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=8))
def test_stop_filter_matches_a_plain_scan_whatever_the_pieces(text, stops, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    f = StopFilter(stops)
    out = "".join(f.push(text[a:b]) for a, b in zip(bounds, bounds[1:]))
    if not f.stopped:
        out += f.flush()
    assert (out, f.stopped) == first_stop(text, stops)


# --- a real daemon ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory, model_path):
    from test_serve import Daemons, free_port

    d = Daemons(tmp_path_factory.mktemp("api"), 1, model_path)
    port = free_port()
    d.start(0, "--api", f"127.0.0.1:{port}")
    try:
        yield port, d
    finally:
        d.stop_all()


def request(port: int, method: str, path: str, body=None, raw: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def local_greedy(model_path, messages: list[tuple[str, str]] | None, prompt: str | None, steps: int) -> tuple[str, int]:
    """What one local engine generates greedily: (text, prompt tokens)."""
    from dllp2p.chat import Message
    from dllp2p.formats import load_model
    from dllp2p.generate import generate
    from dllp2p.jit.engine import JITEngine
    from dllp2p.prompt import chat_tokens
    from dllp2p.sampler import Sampler, SamplerConfig
    from dllp2p.tokenizer import StreamDecoder, Tokenizer

    model = load_model(model_path)
    tok = Tokenizer.from_metadata(model.metadata)
    ids = chat_tokens(tok, model, [Message(r, c) for r, c in messages]) if messages else tok.encode(prompt)
    engine = JITEngine(model, 256, threads=1)
    try:
        dec = StreamDecoder(tok)
        text = "".join(dec.push(t) for t in generate(engine, ids, Sampler(SamplerConfig(temperature=0)), steps, tok.eos_ids))
        return text + dec.flush(), len(ids)
    finally:
        engine.close()


def sse(data: bytes) -> list:
    events = [e.removeprefix(b"data: ") for e in data.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.slow
def test_chat_whole_and_streamed_are_the_local_engines_text(served, model_path):
    served, _ = served
    msgs = [("system", "You are terse."), ("user", "Name a colour.")]
    want, n_prompt = local_greedy(model_path, msgs, None, 12)
    assert want.strip()
    body = {"messages": [{"role": r, "content": c} for r, c in msgs], "temperature": 0, "max_tokens": 12}
    status, data = request(served, "POST", "/v1/chat/completions", body)
    assert status == 200, data
    a = json.loads(data)
    assert a["object"] == "chat.completion" and a["model"] == "SmolLM2-135M-Instruct.Q4_1"
    assert a["choices"][0]["message"] == {"role": "assistant", "content": want}
    assert a["usage"]["prompt_tokens"] == n_prompt and a["usage"]["completion_tokens"] <= 12
    assert a["choices"][0]["finish_reason"] == ("length" if a["usage"]["completion_tokens"] == 12 else "stop")
    status, data = request(served, "POST", "/v1/chat/completions",
                           {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200
    chunks = sse(data)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == want
    assert chunks[-2]["choices"][0]["finish_reason"] == a["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == a["usage"]


@pytest.mark.slow
def test_completion_stops_at_a_stop_string(served, model_path):
    served, _ = served
    full, _ = local_greedy(model_path, None, "The capital of France is", 24)
    assert full.startswith(" Paris") and len(full.split()) > 3
    stop = full.split()[2]  # a word a few tokens in: the text ends just before it
    status, data = request(served, "POST", "/v1/completions", {"prompt": "The capital of France is",
                           "temperature": 0, "max_tokens": 24, "stop": [stop, "zzzz"]})
    assert status == 200, data
    a = json.loads(data)
    assert a["choices"][0]["text"] == full[: full.index(stop)]
    assert a["choices"][0]["finish_reason"] == "stop" and a["usage"]["completion_tokens"] < 24


@pytest.mark.slow
def test_bad_requests_get_http_errors_and_the_daemon_serves_on(served):
    served, _ = served
    assert request(served, "GET", "/v1/models")[0] == 200
    for method, path, raw, want in [("POST", "/v1/chat/completions", b"{not json", 400),
                                    ("POST", "/v1/chat/completions", b'{"messages": "hi"}', 400),
                                    ("GET", "/v1/chat/completions", None, 405),
                                    ("POST", "/v2/anything", b"{}", 404)]:
        status, data = request(served, method, path, raw=raw)
        assert status == want and json.loads(data)["error"]["code"] == want
    with socket.create_connection(("127.0.0.1", served), timeout=30) as s:  # a body over the limit: not read
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (api.MAX_BODY + 1))
        assert s.recv(100).startswith(b"HTTP/1.1 413 ")
    with socket.create_connection(("127.0.0.1", served), timeout=30) as s:  # a head that never ends
        s.sendall(b"GET /health HTTP/1.1\r\nX: " + b"a" * (api.MAX_HEAD + 10))
        assert s.recv(100).startswith(b"HTTP/1.1 431 ")
    status, data = request(served, "POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert status == 200 and json.loads(data)["usage"]["completion_tokens"] >= 1


@pytest.mark.slow
def test_a_conversation_reuses_the_kv_cache_of_its_last_turn(served, model_path):
    """Turn 2 repeats turn 1 and its reply: the kept session's KV cache already holds most of that, and
    the answer is still the local engine's for the whole conversation."""
    port, d = served
    turn1 = [("user", "Name a fruit.")]
    reply, _ = local_greedy(model_path, turn1, None, 16)
    turn2 = turn1 + [("assistant", reply), ("user", "And a vegetable?")]
    want, n_prompt = local_greedy(model_path, turn2, None, 16)
    for turn, answer in ((turn1, reply), (turn2, want)):
        status, data = request(port, "POST", "/v1/chat/completions", {
            "messages": [{"role": r, "content": c} for r, c in turn], "temperature": 0, "max_tokens": 16})
        assert status == 200 and json.loads(data)["choices"][0]["message"]["content"] == answer
    reused = [int(m) for line in d.logs[0] for m in re.findall(r"(\d+) of them already in its KV cache", line)]
    assert reused and n_prompt // 2 < reused[-1] < n_prompt, d.logs[0][-3:]


def test_a_taken_api_port_leaves_the_daemon_serving(tmp_path):
    from test_serve import Daemons

    from dllp2p.wire.client import ask_status

    with socket.create_server(("127.0.0.1", 0)) as taken:
        d = Daemons(tmp_path, 1)
        try:
            address = d.start(0, "--api", f"127.0.0.1:{taken.getsockname()[1]}")
            reply = trio.run(ask_status, address, 10.0)
            assert reply.node_id
            assert any("HTTP API is off" in line for line in d.logs[0])
        finally:
            d.stop_all()
