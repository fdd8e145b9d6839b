"""The OpenAI-compatible HTTP API (dllp2p/api.py on h11, dllp2p/api_schema.py): the JSON -> Generate
mapping and its refusals as pure functions; stop strings against a plain scan; then the HTTP layer
served in this process with a fake daemon behind it (keep-alive, pipelining, chunked bodies, 100-continue,
CORS, slow clients, a client that leaves mid-stream) and the table of malformed requests
(malformed_requests, shared with test_api_live.py, which sends it to a real daemon): each a 4xx in
OpenAI's error shape, no traceback logged, and the next request served."""

from __future__ import annotations

import http.client
import json
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from dllp2p import api
from dllp2p.api_schema import (DEFAULT_CTX, DEFAULT_MAX_TOKENS, IGNORED, NEUTRAL, json_depth, parse_json,
                               to_generate)
from dllp2p.error_codes import CodedError, ErrorCode
from dllp2p.generate import StopFilter
from dllp2p.wire.link import LinkClosed
from dllp2p.wire import ChatTurn, Done, Error, TokenChunk

USER = [{"role": "user", "content": "x"}]
LIMITS = api.Limits(read_timeout=1.0, idle=5.0, max_body=8192, ctx=64)  # of the server in this process


# --- pure: the request -----------------------------------------------------------------------------------


def test_listen_address_takes_port_zero():
    assert api.listen_address("127.0.0.1:0") == ("127.0.0.1", 0)
    assert api.listen_address("[::1]:7341") == ("::1", 7341)
    with pytest.raises(ValueError):
        api.listen_address("nowhere")


def test_chat_body_to_generate():
    g, opts = to_generate("chat", {
        "model": "anything", "messages": [{"role": "developer", "content": "Be brief."},
                                          {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                                       {"type": "text", "text": "there"}]}],
        "max_completion_tokens": 7, "temperature": 0, "top_p": 0.5, "seed": 3, "stop": "\n", "stream": True,
        "stream_options": {"include_usage": True}, "top_k": 5, "repeat_penalty": 1.1, "user": "ignored",
        "n": 1, "logprobs": False, "tools": None, "frequency_penalty": 0})
    assert g.messages == (ChatTurn("system", "Be brief."), ChatTurn("user", "Hi there"))
    assert (g.steps, g.temperature, g.top_p, g.seed, g.stop, g.top_k, g.repeat_penalty) == (7, 0.0, 0.5, 3, ("\n",), 5, 1.1)
    assert (opts.kind, opts.stream, opts.include_usage) == ("chat", True, True)
    d, opts = to_generate("chat", {"messages": USER})
    # OpenAI's defaults where it has the field, `dllp2p run`'s where it does not
    assert (d.steps, d.temperature, d.top_p, d.top_k, d.min_p, d.repeat_penalty, d.seed, d.stop, d.ctx) == (
        DEFAULT_MAX_TOKENS, 1.0, 1.0, 40, 0.05, 1.0, None, (), DEFAULT_CTX)
    assert not opts.stream
    assert to_generate("chat", {"messages": USER}, ctx=100)[0].steps == 99  # the default fits the context


@pytest.mark.parametrize("prompt,want", [("Once", ("Once", ())), (["Once"], ("Once", ())), ([5, 6], ("", (5, 6))),
                                         ([[5, 6]], ("", (5, 6)))])
def test_completion_prompt_forms(prompt, want):
    g, opts = to_generate("completion", {"prompt": prompt})
    assert (g.prompt, g.tokens, g.messages, opts.kind) == (*want, (), "completion")


# Every field we do not implement, at a value that would change the answer: refused by name.
UNSUPPORTED = [
    ("chat", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("chat", "tool_choice", "auto"),
    ("chat", "response_format", {"type": "json_object"}),
    ("chat", "grammar", "root ::= \"a\""),
    ("chat", "logprobs", True),
    ("chat", "top_logprobs", 2),
    ("chat", "n", 2),
    ("chat", "n", True),  # not 1, whatever Python thinks
    ("chat", "logit_bias", {"50256": -100}),
    ("chat", "functions", [{"name": "f"}]),
    ("chat", "function_call", "auto"),
    ("chat", "frequency_penalty", 0.5),
    ("chat", "presence_penalty", -1),
    ("chat", "modalities", ["text", "audio"]),
    ("chat", "audio", {"voice": "x"}),
    ("chat", "prediction", {"type": "content", "content": "x"}),
    ("chat", "some_future_field", 1),
    ("chat", "prompt", "x"),  # a completion's field in a chat request
    ("completion", "best_of", 3),
    ("completion", "echo", True),
    ("completion", "suffix", "end"),
    ("completion", "logprobs", 0),
    ("completion", "messages", USER),  # a chat's field in a completion request
    ("completion", "max_completion_tokens", 5),
]


@pytest.mark.parametrize("kind,key,value", UNSUPPORTED)
def test_unimplemented_fields_are_refused_by_name(kind, key, value):
    base = {"messages": USER} if kind == "chat" else {"prompt": "x"}
    with pytest.raises(CodedError) as e:
        to_generate(kind, {**base, key: value})
    assert e.value.code is ErrorCode.UNSUPPORTED and e.value.param == key and key in str(e.value)


def test_every_neutral_and_ignored_field_is_accepted():
    body = {"messages": USER, **{k: v[0] for k, v in NEUTRAL.items()}, **{k: "x" for k in IGNORED}}
    body["metadata"] = None
    to_generate("chat", body)


# (kind, body, the param named, words in the message)
BAD_BODIES = [
    ("chat", [], None, "JSON object"),
    ("chat", {}, "messages", "messages"),
    ("chat", {"messages": []}, "messages", "messages"),
    ("chat", {"messages": "hi"}, "messages", "messages"),
    ("chat", {"messages": [7]}, "messages[0]", "object"),
    ("chat", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "role"),
    ("chat", {"messages": [{"role": 3, "content": "x"}]}, "messages[0].role", "role"),
    ("chat", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content", "text"),
    ("chat", {"messages": [{"role": "user", "content": "x", "name": 5}]}, "messages[0].name", "string"),
    ("chat", {"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls", "not supported"),
    ("chat", {"messages": USER, "temperature": "hot"}, "temperature", "number"),
    ("chat", {"messages": USER, "temperature": 3}, "temperature", "number"),
    ("chat", {"messages": USER, "top_p": []}, "top_p", "number"),
    ("chat", {"messages": USER, "min_p": {}}, "min_p", "number"),
    ("chat", {"messages": USER, "repeat_penalty": 0}, "repeat_penalty", "number"),
    ("chat", {"messages": USER, "top_k": True}, "top_k", "whole number"),
    ("chat", {"messages": USER, "max_tokens": 0}, "max_tokens", "max_tokens"),
    ("chat", {"messages": USER, "max_tokens": 1.5}, "max_tokens", "whole number"),
    ("chat", {"messages": USER, "max_tokens": DEFAULT_CTX}, "max_tokens", "max_tokens"),
    ("chat", {"messages": USER, "max_tokens": True}, "max_tokens", "max_tokens"),
    ("chat", {"messages": USER, "max_completion_tokens": "9"}, "max_completion_tokens", "whole number"),
    ("chat", {"messages": USER, "seed": "1"}, "seed", "whole number"),
    ("chat", {"messages": USER, "seed": 1 << 64}, "seed", "whole number"),
    ("chat", {"messages": USER, "stream": "yes"}, "stream", "true or false"),
    ("chat", {"messages": USER, "stream_options": 1}, "stream_options", "object"),
    ("chat", {"messages": USER, "stream_options": {"include_usage": "y"}}, "include_usage", "true or false"),
    ("chat", {"messages": USER, "stream_options": {"other": 1}}, "stream_options", "include_usage"),
    ("chat", {"messages": USER, "stop": 5}, "stop", "stop"),
    ("chat", {"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop", "stop"),
    ("chat", {"messages": USER, "stop": [""]}, "stop", "stop"),
    ("chat", {"messages": USER, "stop": "s" * 257}, "stop", "stop"),
    ("chat", {"messages": USER, "model": 5}, "model", "string"),
    ("chat", {"messages": USER, "user": ["x"]}, "user", "string"),
    ("completion", {"prompt": ""}, "prompt", "prompt"),
    ("completion", {"prompt": 5}, "prompt", "prompt"),
    ("completion", {"prompt": ["a", "b"]}, "prompt", "prompt"),
    ("completion", {"prompt": [1, -2]}, "prompt", "out of range"),
    ("completion", {"prompt": [1, 2 ** 70]}, "prompt", str(2 ** 70)),
    ("completion", {"prompt": [1.5]}, "prompt", "prompt"),
    ("completion", {"prompt": [True]}, "prompt", "prompt"),
]


@pytest.mark.parametrize("kind,body,param,says", BAD_BODIES)
def test_bad_bodies_name_the_field(kind, body, param, says):
    with pytest.raises(CodedError) as e:
        to_generate(kind, body)
    assert e.value.code.http_status == 400 and e.value.param == param and says in str(e.value)


def test_json_depth_skips_strings():
    assert json_depth(b'{"a": [1, {"b": "[[[{{{"}], "c": "\\"]]]"}') == 3
    assert json_depth(b"[" * 100_000 + b"]" * 100_000) == 100_000


@pytest.mark.parametrize("data,says", [
    (b"{not json", "not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "deeper than"),
    (b'{"a": ' * 40 + b"1" + b"}" * 40, "deeper than"),
    (b'{"prompt": "\\ud800"}', "surrogate"),
    (b'{"\\udfff": 1}', "surrogate"),
    (b'{"prompt": "\xff\xfe"}', "not JSON"),
    (b'{"temperature": NaN}', "NaN"),
    (b'{"temperature": -Infinity}', "Infinity"),
    (b'{"max_tokens": ' + b"9" * 5000 + b"}", "not JSON"),
    (b"", "not JSON"),
])
def test_parse_json_refuses(data, says):
    with pytest.raises(CodedError) as e:
        parse_json(data)
    assert e.value.code is ErrorCode.INVALID_JSON and says in str(e.value)


def test_parse_json_takes_deep_enough_and_unicode():
    assert parse_json('{"a": [[["é😀"]]]}'.encode()) == {"a": [[["é😀"]]]}


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


def test_host_allowlist():
    """DNS rebinding: only IP literals, localhost names, and the names this API was told (api_access)."""
    names = frozenset({"pi.home"})
    for ok in (None, "localhost", "LOCALHOST:7341", "app.localhost", "127.0.0.1:7341", "[::1]:7341", "192.168.1.5",
               "10.0.0.1:80", "pi.home", "Pi.Home.:7341", "[fe80::1]"):
        assert api.host_allowed(ok, names), ok
    for no in ("evil.example", "localhost.evil.example", "127.0.0.1.nip.io", "pi.home.evil", "", " ", "a b",
               "localhost/x", "[::1", "[evil]:1", "localhost:99999999", "xn--e1a.example", "l\u043ecalhost"):
        assert not api.host_allowed(no, names), no
    assert api.local_names("127.0.0.1") == frozenset()
    assert api.local_names("localhost", ("Pi.Home.",)) == {"localhost", "pi.home"}
    assert socket.gethostname().lower() in api.local_names("0.0.0.0")


def test_cors_origins():
    assert api.origin_allowed(None)
    for ok in ("http://localhost", "http://localhost:3000", "https://127.0.0.1:8080", "http://127.1.2.3", "http://[::1]:5"):
        assert api.origin_allowed(ok), ok
    for no in ("http://evil.example", "http://localhost.evil.example", "http://127.0.0.1.evil.example", "null",
               "file://", "http://192.168.1.5:3000", "http://localhost:3000/x"):
        assert not api.origin_allowed(no), no


# --- HTTP, served in this process ------------------------------------------------------------------------


async def fake_submit(sink, g) -> None:
    """A daemon stand-in: the prompt's words back as TokenChunks; "busy" -> Error(BUSY); "forever" -> chunks
    until the sink says the client is gone (recorded in GONE)."""
    words = (g.prompt or " ".join(t.content for t in g.messages) or "ids").split()
    if words == ["busy"]:
        await sink.send(Error(ErrorCode.BUSY, "node x is busy"))
        return
    if words == ["forever"]:
        try:
            while True:
                await sink.send(TokenChunk("tick "))
                await trio.sleep(0.01)
        except LinkClosed:
            GONE.put(True)
            raise
    for w in words:
        await sink.send(TokenChunk(w + " "))
    await sink.send(Done(len(words), len(words), 1.0, 1.0, 1, "fake", (), "eos"))


GONE: queue.Queue = queue.Queue()


class InProcess:
    """api.Api(fake_submit) on a loopback port, its trio loop in a thread."""

    def __init__(self, limits: api.Limits = api.Limits(), submit: Callable = fake_submit):
        self.limits, self.submit = limits, submit
        self._port: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            nursery.start_soon(trio.serve_listeners, api.Api(self.submit, "fake-model", self.limits).connection,
                               listeners)
            self._port.put(listeners[0].socket.getsockname()[1])
            await trio.to_thread.run_sync(self._stop.wait)
            nursery.cancel_scope.cancel()

    def __enter__(self) -> int:
        self._thread.start()
        return self._port.get(timeout=10)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def server(caplog):
    caplog.set_level(logging.INFO, logger="dllp2p.api")
    with InProcess(LIMITS) as port:
        yield port
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records), caplog.text


def exchange(port: int, raw: bytes, timeout: float = 30, closes: bool = False) -> tuple[int, dict[str, str], bytes, bool]:
    """raw bytes on a fresh connection -> (status, headers, body, whether the server then closed it:
    looked at only when `closes`, waiting up to 2 s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):  # answered and closed before reading it all
            pass
        r = http.client.HTTPResponse(s)
        r.begin()
        body = r.read()
        if not closes:
            return r.status, {k.lower(): v for k, v in r.getheaders()}, body, False
        s.settimeout(2)
        try:
            closed = s.recv(1) == b""
        except (TimeoutError, socket.timeout):
            closed = False
        except ConnectionResetError:
            closed = True
        return r.status, {k.lower(): v for k, v in r.getheaders()}, body, closed


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def chat(body: dict, extra: str = "") -> bytes:
    return post("/v1/chat/completions", json.dumps({"messages": USER, **body}).encode(), extra)


@dataclass(frozen=True)
class Bad:
    name: str
    raw: bytes
    status: int
    code: str
    closes: bool = False  # the server must close the connection after answering


def malformed_requests(limits: api.Limits) -> list[Bad]:
    """Requests a client may get wrong, each with the answer it must get (for any server with these limits)."""
    cl = b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
    body = b'{"prompt": "hi"}'
    return [
        Bad("content-length superscript two", "POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: ²\r\n\r\n"
            .encode(), 400, "bad_http", True),
        Bad("content-length arabic-indic digits", "POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: ١٦\r\n"
            "\r\n".encode() + body, 400, "bad_http", True),
        Bad("content-length 5000 digits", cl + b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n", 400, "bad_http", True),
        Bad("content-length 19 digits", cl + b"Content-Length: " + b"1" * 19 + b"\r\n\r\n", 400, "bad_http", True),
        Bad("content-length sign", cl + b"Content-Length: +16\r\n\r\n" + body, 400, "bad_http", True),
        Bad("conflicting content-lengths", cl + b"Content-Length: 16\r\nContent-Length: 17\r\n\r\n" + body + b" ",
            400, "bad_http", True),
        Bad("content-length with transfer-encoding", cl + b"Content-Length: 16\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"10\r\n" + body + b"\r\n0\r\n\r\n", 400, "bad_http", True),
        Bad("transfer-encoding gzip", cl + b"Transfer-Encoding: gzip, chunked\r\n\r\n", 400, "bad_http", True),
        Bad("bad chunk size", cl + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n" + body + b"\r\n0\r\n\r\n", 400,
            "bad_http", True),
        Bad("huge head", b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * (limits.max_head + 10) + b"\r\n\r\n",
            431, "head_too_large", True),
        Bad("head that never ends", b"GET /health HTTP/1.1\r\nX: " + b"a" * (limits.max_head + 10), 431,
            "head_too_large", True),
        Bad("too many headers", b"GET /health HTTP/1.1\r\nHost: localhost\r\n" + b"".join(
            b"X-%d: 1\r\n" % i for i in range(limits.max_headers + 1)) + b"\r\n", 431, "too_many_headers", True),
        Bad("body over the limit", cl + b"Content-Length: %d\r\n\r\n" % (limits.max_body + 1), 413, "body_too_large",
            True),
        Bad("chunked body over the limit", cl + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(
            b"%x\r\n%s\r\n" % (1024, b" " * 1024) for _ in range(limits.max_body // 1024 + 2)) + b"0\r\n\r\n", 413,
            "body_too_large", True),
        Bad("no host", b"GET /health HTTP/1.1\r\n\r\n", 400, "bad_http", True),
        Bad("request line", b"GET /health HTTP/1.1 extra\r\nHost: localhost\r\n\r\n", 400, "bad_http", True),
        Bad("bad JSON", post("/v1/chat/completions", b"{not json"), 400, "invalid_json"),
        Bad("JSON nested 100k deep", post("/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
            # over the body limit of a small server: then it is that
            413 if 200_012 > limits.max_body else 400, "body_too_large" if 200_012 > limits.max_body else "invalid_json",
            200_012 > limits.max_body),
        Bad("JSON nested 40 deep", post("/v1/completions", b'{"prompt": ' + b"[" * 40 + b"]" * 40 + b"}"), 400,
            "invalid_json"),
        Bad("lone surrogate", post("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
            400, "invalid_json"),
        Bad("invalid UTF-8", post("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}'),
            400, "invalid_json"),
        Bad("NaN temperature", post("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], '
                                                            b'"temperature": NaN}'), 400, "invalid_json"),
        Bad("max_tokens of 5000 digits", post("/v1/completions", b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}"),
            400, "invalid_json"),
        Bad("body not an object", post("/v1/completions", b"[1]"), 400, "invalid_value"),
        Bad("empty body", post("/v1/completions", b""), 400, "invalid_json"),
        *(Bad(f"wrong type: {param}", post("/v1/chat/completions" if kind == "chat" else "/v1/completions",
                                            json.dumps(body).encode()),
              400, "unsupported_parameter" if "not supported" in says else "invalid_value")
          for kind, body, param, says in BAD_BODIES
          if isinstance(body, dict) and ("out of range" not in says and str(2 ** 70) not in says)),
        *(Bad(f"unimplemented: {key}={json.dumps(value)[:20]}",
              chat({key: value}) if kind == "chat" else post("/v1/completions", json.dumps({"prompt": "x", key: value})
                                                             .encode()), 400, "unsupported_parameter")
          for kind, key, value in UNSUPPORTED),
        Bad("token id 2**70", post("/v1/completions", b'{"prompt": [1, %d]}' % 2 ** 70), 400, "invalid_token"),
        Bad("negative token id", post("/v1/completions", b'{"prompt": [-1]}'), 400, "invalid_token"),
        Bad("stop string too long", chat({"stop": "s" * 300}), 400, "invalid_value"),
        Bad("max_tokens over the context", chat({"max_tokens": limits.ctx}), 400, "invalid_value"),
        Bad("unknown path", post("/v2/anything", b"{}"), 404, "not_found"),
        Bad("unknown model", b"GET /v1/models/nope HTTP/1.1\r\nHost: localhost\r\n\r\n", 404, "not_found"),
        Bad("wrong method", b"GET /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n\r\n", 405, "method_not_allowed"),
        Bad("wrong method on models", post("/v1/models", b"{}"), 405, "method_not_allowed"),
        Bad("foreign origin", chat({}, "Origin: http://evil.example\r\n"), 403, "origin_not_allowed"),
        Bad("rebound host", b"GET /v1/models HTTP/1.1\r\nHost: evil.example:7341\r\n\r\n", 421, "host_not_allowed"),
        Bad("rebound host POST", post("/v1/completions", b'{"prompt": "x"}').replace(b"Host: localhost", b"Host: a.evil"),
            421, "host_not_allowed"),
        Bad("rebound host preflight", b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: localhost.evil.example\r\n"
            b"Origin: http://localhost\r\nAccess-Control-Request-Method: POST\r\n\r\n", 421, "host_not_allowed"),
        Bad("host with a path", b"GET /health HTTP/1.1\r\nHost: localhost/x\r\n\r\n", 421, "host_not_allowed"),
        Bad("foreign origin preflight", b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nOrigin: "
            b"http://localhost.evil.example\r\nAccess-Control-Request-Method: POST\r\n\r\n", 403, "origin_not_allowed"),
    ]


def check_error(status: int, body: bytes, want_status: int, want_code: str) -> None:
    assert status == want_status, body[:300]
    e = json.loads(body)["error"]
    assert set(e) == {"message", "type", "param", "code"} and isinstance(e["message"], str) and e["message"]
    assert e["code"] == want_code and e["type"] == "invalid_request_error", e




@pytest.mark.parametrize("bad", malformed_requests(LIMITS), ids=lambda b: b.name)
def test_malformed_requests_in_process(server, bad):
    status, headers, body, closed = exchange(server, bad.raw, closes=bad.closes)
    check_error(status, body, bad.status, bad.code)
    if bad.closes:
        assert headers.get("connection") == "close" and closed
    status, _, body, _ = exchange(server, chat({"max_tokens": 5}))
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "x "


def test_the_connection_serves_on_after_a_client_mistake(server):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    try:
        for body, want in [(b"{bad", 400), (json.dumps({"prompt": "a b"}).encode(), 200), (b'{"prompt": 5}', 400),
                           (json.dumps({"prompt": "c"}).encode(), 200)]:
            conn.request("POST", "/v1/completions", body=body)
            r = conn.getresponse()
            data = r.read()
            assert r.status == want and r.getheader("connection") is None, data
        conn.request("GET", "/v1/models")
        r = conn.getresponse()
        assert json.loads(r.read())["data"][0]["id"] == "fake-model"
        conn.request("GET", "/v1/models/fake-model")
        r = conn.getresponse()
        assert json.loads(r.read()) == {"id": "fake-model", "object": "model", "created": 0, "owned_by": "dllp2p"}
    finally:
        conn.close()


def test_pipelined_requests_are_answered_in_order(server):
    two = post("/v1/completions", b'{"prompt": "one"}') + post("/v1/completions", b'{"prompt": "two"}')
    with socket.create_connection(("127.0.0.1", server), timeout=10) as s:
        s.sendall(two)
        texts = []
        f = s.makefile("rb")  # one reader for both answers (an HTTPResponse each would buffer its own)
        for _ in range(2):
            assert f.readline().startswith(b"HTTP/1.1 200 ")
            headers = dict(line.decode().strip().lower().split(": ", 1) for line in iter(f.readline, b"\r\n"))
            texts.append(json.loads(f.read(int(headers["content-length"])))["choices"][0]["text"])
    assert texts == ["one ", "two "]


def test_chunked_body_and_100_continue(server):
    body = json.dumps({"prompt": "chunked body"}).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 5]), body[i:i + 5]) for i in range(0, len(body), 5))
    head = b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server), timeout=10) as s:
        s.sendall(head)
        assert s.recv(100).startswith(b"HTTP/1.1 100 ")
        s.sendall(chunks + b"0\r\n\r\n")
        r = http.client.HTTPResponse(s)
        r.begin()
        assert r.status == 200 and json.loads(r.read())["choices"][0]["text"] == "chunked body "


def test_http_1_0_gets_its_answer_and_a_close(server):
    status, headers, body, closed = exchange(server, b"GET /health HTTP/1.0\r\n\r\n", closes=True)
    assert status == 200 and json.loads(body) == {"status": "ok"} and closed
    data = b'{"prompt": "ab", "stream": true}'
    status, headers, body, closed = exchange(
        server, b"POST /v1/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data), closes=True)
    assert status == 200 and closed and body.endswith(b"data: [DONE]\n\n")


def test_cors_preflight_and_simple_requests_from_loopback_origins(server):
    status, headers, body, closed = exchange(server, b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                                             b"Origin: http://localhost:5173\r\nAccess-Control-Request-Method: POST\r\n"
                                             b"Access-Control-Request-Headers: content-type, authorization\r\n\r\n")
    assert status == 204 and body == b""
    assert headers["access-control-allow-origin"] == "http://localhost:5173"
    assert "POST" in headers["access-control-allow-methods"]
    assert headers["access-control-allow-headers"] == "content-type, authorization"
    status, headers, body, _ = exchange(server, chat({}, "Origin: http://127.0.0.1:8080\r\n"))
    assert status == 200 and headers["access-control-allow-origin"] == "http://127.0.0.1:8080"
    status, headers, body, _ = exchange(server, chat({}))
    assert status == 200 and "access-control-allow-origin" not in headers
    status, headers, body, _ = exchange(server, b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert status == 204 and "GET" in headers["allow"]


@pytest.mark.parametrize("trickle", [False, True])
def test_a_slow_client_gets_408_and_the_server_serves_on(server, trickle):
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", server), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\n")
        if trickle:  # a byte now and then, never the end of the head
            for _ in range(8):
                time.sleep(0.2)
                try:
                    s.sendall(b"X")
                except (BrokenPipeError, ConnectionResetError):
                    break
        r = http.client.HTTPResponse(s)
        r.begin()
        check_error(r.status, r.read(), 408, "request_timeout")
    assert time.monotonic() - t0 < LIMITS.read_timeout + 2
    status, _, _, _ = exchange(server, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert status == 200


def test_a_silent_keep_alive_connection_is_closed_without_a_word(caplog):
    caplog.set_level(logging.INFO, logger="dllp2p.api")
    with InProcess(api.Limits(idle=0.3)) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            assert s.recv(100) == b""  # closed after Limits.idle, no 408 to a client that sent nothing
    assert "Traceback" not in caplog.text


def test_the_daemons_error_gets_its_status(server):
    status, _, body, _ = exchange(server, post("/v1/completions", b'{"prompt": "busy"}'))
    assert status == 503
    e = json.loads(body)["error"]
    assert e["code"] == "busy" and e["type"] == "server_error" and "busy" in e["message"]
    status, _, body, _ = exchange(server, post("/v1/completions", b'{"prompt": "busy", "stream": true}'))
    assert status == 503  # an Error before the first piece still gets its status line


def test_a_client_that_leaves_mid_stream_stops_the_generation(server):
    while not GONE.empty():
        GONE.get()
    with socket.create_connection(("127.0.0.1", server), timeout=10) as s:
        s.sendall(post("/v1/completions", b'{"prompt": "forever", "stream": true}'))
        got = b""
        while b"tick" not in got:
            got += s.recv(4096)
    assert GONE.get(timeout=10)
    status, _, _, _ = exchange(server, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert status == 200


def test_a_client_that_leaves_a_whole_answer_stops_the_generation(server):
    """Not streamed, nothing is sent until the end: the client's close is still noticed at once."""
    while not GONE.empty():
        GONE.get()
    with socket.create_connection(("127.0.0.1", server), timeout=10) as s:
        s.sendall(post("/v1/completions", b'{"prompt": "forever"}'))
        time.sleep(0.3)  # generating
    assert GONE.get(timeout=10)
    status, _, _, _ = exchange(server, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert status == 200


def test_connections_over_the_limit_get_503(caplog):
    caplog.set_level(logging.INFO, logger="dllp2p.api")
    with InProcess(api.Limits(max_connections=2)) as port:
        held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
        try:
            time.sleep(0.2)  # both accepted and being served
            status, headers, body, closed = exchange(port, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n", closes=True)
            assert status == 503 and json.loads(body)["error"]["code"] == "busy" and closed
        finally:
            for s in held:
                s.close()
        deadline = time.monotonic() + 5  # until the server has seen them go
        while (status := exchange(port, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")[0]) != 200:
            assert status == 503 and time.monotonic() < deadline
            time.sleep(0.05)
    assert "Traceback" not in caplog.text


def test_the_api_context_comes_from_file_env_and_flag(tmp_path):
    from dllp2p.cli import build_parser, daemon_config

    path = tmp_path / "config.toml"
    path.write_text("[daemon]\napi_ctx = 512\n")

    def cfg(argv, env):
        return daemon_config(build_parser().parse_args(["daemon", *argv]), {"DLLP2P_CONFIG": str(path), **env})

    assert cfg([], {}).api_ctx == 512
    assert cfg([], {"DLLP2P_API_CTX": "1024"}).api_ctx == 1024
    assert cfg(["--api-ctx", "4096"], {"DLLP2P_API_CTX": "1024"}).api_ctx == 4096
    path.write_text('[daemon]\napi_hosts = ["pi.home"]\n')
    assert cfg([], {}).api_hosts == ("pi.home",)
    assert cfg([], {"DLLP2P_API_HOSTS": "a.lan, b.lan"}).api_hosts == ("a.lan", "b.lan")
    assert cfg(["--api-host", "c.lan"], {"DLLP2P_API_HOSTS": "a.lan"}).api_hosts == ("c.lan",)
    path.write_text("")
    assert cfg([], {}).api_ctx == DEFAULT_CTX
    with pytest.raises(ValueError):
        cfg(["--api-ctx", "1"], {})


def test_head_requests_get_headers_only_and_the_connection_serves_on(server):
    with socket.create_connection(("127.0.0.1", server), timeout=10) as s:
        f = s.makefile("rb")
        for path, status in [(b"/health", 200), (b"/v1/chat/completions", 405), (b"/nope", 404), (b"/health", 200)]:
            s.sendall(b"HEAD %s HTTP/1.1\r\nHost: localhost\r\n\r\n" % path)
            assert f.readline().startswith(b"HTTP/1.1 %d " % status)
            headers = dict(line.decode().strip().lower().split(": ", 1) for line in iter(f.readline, b"\r\n"))
            assert int(headers["content-length"]) > 0 and "connection" not in headers  # no body follows
        s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert f.readline().startswith(b"HTTP/1.1 200 ")
        headers = dict(line.decode().strip().lower().split(": ", 1) for line in iter(f.readline, b"\r\n"))
        assert json.loads(f.read(int(headers["content-length"]))) == {"status": "ok"}
