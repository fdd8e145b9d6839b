"""An OpenAI-compatible HTTP API, served by a daemon: the cluster behind the endpoints chat clients and
libraries already speak.

    dllp2p daemon --api 127.0.0.1:7341
    curl http://127.0.0.1:7341/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'

    POST /v1/chat/completions   messages -> the model's chat template; "stream": true for server-sent events
    POST /v1/completions        prompt (text, or token ids) as it is
    GET  /v1/models             the model this daemon serves as root ("model" in a request is not checked)
    GET  /health

Data flow of a request: HTTP bytes -> read_request (an HttpRequest) -> to_generate (its JSON body ->
protocol.Generate, every field checked) -> a link to this daemon's own port, exactly what `dllp2p run`
sends (the daemon serves the prompt as root or forwards it to the root) -> TokenChunk ... Done -> the
OpenAI-shaped answer, whole or one event per chunk. Stop strings end generation on the root, so usage
counts stay exact.

Sampling: temperature (default 1, as OpenAI's), top_p (default 1), seed, max_tokens (or
max_completion_tokens; default 256), stop (up to 4 strings); beyond OpenAI's fields, top_k, min_p and
repeat_penalty as `dllp2p run` has them (defaults 40, 0.05, 1). n must be 1; logprobs and non-zero
frequency/presence penalties are refused rather than ignored.

Bad input gets an HTTP error with OpenAI's error body and the daemon serves on: 400 malformed JSON or
fields, 404 unknown path, 405 wrong method, 408 a request not sent within READ_TIMEOUT, 411 no
Content-Length, 413 a body over MAX_BODY, 431 a head over MAX_HEAD; the daemon's own Error (busy, no
model, a worker lost) -> 503 (busy, unreachable) or 500, with its message. One request per connection.
There is no authentication yet: keep it on loopback (the default) until the cluster key arrives.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any, Mapping

import trio

from .link import LinkClosed, LinkTimeout, TrioLink, format_address, open_link, parse_address
from .protocol import CHAT_ROLES, ChatTurn, Done, Error, Generate, ProtocolError, TokenChunk
from .run import daemon_request
from .sampler import SamplerConfig

log = logging.getLogger("dllp2p.api")

MAX_HEAD = 16 << 10  # bytes of request line + headers
MAX_BODY = 1 << 20  # bytes of a request body
READ_TIMEOUT = 30.0  # seconds for a client to send its whole request
MAX_STOP = 4  # stop strings per request, as OpenAI's
DEFAULT_MAX_TOKENS = 256  # as `dllp2p run --steps`
DEFAULT_CTX = 2048  # as `dllp2p run --ctx`
FINISH = {"eos": "stop", "stop": "stop", "steps": "length", "context": "length"}  # GenerationStats.stop_reason


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class ClientGone(Exception):
    """The client closed its connection before sending a whole request."""


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str  # without the query
    headers: Mapping[str, str]  # names in lower case
    body: bytes


@dataclass(frozen=True)
class Options:
    """What the answer needs besides the Generate."""

    kind: str  # "chat" or "completion"
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last event with the token counts


def listen_address(address: str) -> tuple[str, int]:
    """'host:port' to listen on (port 0: any free one) -> (host, port). Raises ValueError."""
    return parse_address(address, listen=True)


# --- HTTP in -------------------------------------------------------------------------------------------


def parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """Request line and headers (without the blank line) -> (method, path, headers). Raises HttpError(400)."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, f"malformed request line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or " " in name:
            raise HttpError(400, f"malformed header line {line[:80]!r}")
        headers[name.lower()] = value.strip()
    return parts[0].upper(), parts[1].split("?", 1)[0], headers


async def read_request(stream: trio.abc.Stream) -> HttpRequest:
    """One request off the stream (answering `Expect: 100-continue`). Raises HttpError, ClientGone."""
    buf = bytearray()
    with trio.move_on_after(READ_TIMEOUT) as waited:
        while (end := buf.find(b"\r\n\r\n")) < 0:
            if len(buf) > MAX_HEAD:
                raise HttpError(431, f"request head over {MAX_HEAD} bytes")
            if not (data := await stream.receive_some(1 << 16)):
                raise ClientGone()
            buf += data
        if end > MAX_HEAD:
            raise HttpError(431, f"request head over {MAX_HEAD} bytes")
        method, path, headers = parse_head(bytes(buf[:end]))
        body = buf[end + 4:]
        if "transfer-encoding" in headers:
            raise HttpError(411, "chunked request bodies are not supported: send Content-Length")
        length = headers.get("content-length", "0")
        if not length.isdigit():
            raise HttpError(400, f"Content-Length {length[:20]!r} is not a number")
        if int(length) > MAX_BODY:
            raise HttpError(413, f"request body of {length} bytes is over {MAX_BODY}")
        if int(length) > len(body) and headers.get("expect", "").lower() == "100-continue":
            await stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
        while len(body) < int(length):
            if not (data := await stream.receive_some(1 << 16)):
                raise ClientGone()
            body += data
        return HttpRequest(method, path, headers, bytes(body[: int(length)]))
    assert waited.cancelled_caught
    raise HttpError(408, f"the request was not sent within {READ_TIMEOUT:g} s")


# --- JSON body -> Generate ---------------------------------------------------------------------------


def _number(body: Mapping[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise HttpError(400, f"{key} must be a number in [{lo:g}, {hi:g}], not {v!r}")
    return float(v)


def _integer(body: Mapping[str, Any], key: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise HttpError(400, f"{key} must be a whole number in [{lo}, {hi}], not {v!r}")
    return v


def _text_content(content: Any, where: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise HttpError(400, f"{where}.content must be a string or a list of text parts (this model reads text only)")


def _messages(body: Mapping[str, Any]) -> tuple[ChatTurn, ...]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise HttpError(400, "messages must be a non-empty list")
    turns = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise HttpError(400, f"messages[{i}] must be an object")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in CHAT_ROLES:
            raise HttpError(400, f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, not {m.get('role')!r}")
        turns.append(ChatTurn(role, _text_content(m.get("content"), f"messages[{i}]")))
    return tuple(turns)


def _prompt(body: Mapping[str, Any]) -> tuple[str, tuple[int, ...]]:
    """A completion's prompt: text, a list of one text, or token ids."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if isinstance(p, str) and p:
        return p, ()
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in p):
        return "", tuple(p)
    raise HttpError(400, "prompt must be a non-empty string (or one such string in a list, or a list of token ids)")


def _stops(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise HttpError(400, f"stop must be a non-empty string or a list of up to {MAX_STOP} of them")
    return tuple(stops)


def to_generate(kind: str, body: Any, ctx: int = DEFAULT_CTX) -> tuple[Generate, Options]:
    """An OpenAI request body (parsed JSON) -> (the Generate for the daemon, answer options). Pure; raises
    HttpError(400) naming the first bad field."""
    if not isinstance(body, dict):
        raise HttpError(400, "the request body must be a JSON object")
    if body.get("n", 1) != 1:
        raise HttpError(400, "n must be 1")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") not in (None, 0):
        raise HttpError(400, "logprobs are not supported")
    for key in ("frequency_penalty", "presence_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise HttpError(400, f"{key} is not supported; repeat_penalty (llama.cpp's, e.g. 1.1) is")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise HttpError(400, "stream must be true or false")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise HttpError(400, "stream_options must be an object")
    steps_key = "max_completion_tokens" if kind == "chat" and "max_completion_tokens" in body else "max_tokens"
    steps = _integer(body, steps_key, DEFAULT_MAX_TOKENS, 1, ctx - 1)
    seed = _integer(body, "seed", None, -(1 << 63), (1 << 63) - 1)
    sampler = SamplerConfig(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_k=_integer(body, "top_k", 40, 0, 1 << 20),
        top_p=max(_number(body, "top_p", 1.0, 0.0, 1.0), 1e-9),  # 0: the best token only
        min_p=_number(body, "min_p", 0.05, 0.0, 0.999),
        repeat_penalty=_number(body, "repeat_penalty", 1.0, 0.01, 10.0),
        seed=None if seed is None else seed & ((1 << 64) - 1),  # numpy seeds are unsigned
    )
    if kind == "chat":
        prompt, tokens, messages = "", (), _messages(body)
    else:
        (prompt, tokens), messages = _prompt(body), ()
    try:
        g = daemon_request(sampler, steps, ctx, prompt=prompt, tokens=tokens, chat=bool(messages), messages=messages,
                           stop=_stops(body))
    except ProtocolError as e:
        raise HttpError(400, str(e)) from None
    return g, Options(kind, stream, bool(so.get("include_usage", False)))


# --- the answer ----------------------------------------------------------------------------------------


REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
           411: "Length Required", 413: "Content Too Large", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable"}


def head(status: int, content_type: str, length: int | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, '')}", f"Content-Type: {content_type}", "Connection: close",
             "Cache-Control: no-cache"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def error_body(e: HttpError) -> dict[str, Any]:
    return {"error": {"message": e.message, "type": e.kind, "code": e.status}}


async def send_json(stream: trio.abc.Stream, status: int, obj: Any) -> None:
    data = json.dumps(obj).encode()
    await stream.send_all(head(status, "application/json", len(data)) + data)


def event(obj: Any) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


class Answer:
    """The OpenAI JSON shapes of one request's answer (chat.completion[.chunk] or text_completion)."""

    def __init__(self, opts: Options, model: str):
        self.opts, self.model = opts, model
        self.id = ("chatcmpl-" if opts.kind == "chat" else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def _wrap(self, choice: dict, chunk: bool) -> dict:
        obj = "chat.completion" + (".chunk" if chunk else "") if self.opts.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}

    @staticmethod
    def usage(done: Done) -> dict:
        return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.generated_tokens,
                "total_tokens": done.prompt_tokens + done.generated_tokens}

    def whole(self, text: str, done: Done) -> dict:
        reason = FINISH.get(done.stop_reason, "stop")
        if self.opts.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {**self._wrap(choice, False), "usage": self.usage(done)}

    def chunk(self, text: str | None, reason: str | None = None, role: bool = False) -> dict:
        if self.opts.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            return self._wrap({"index": 0, "delta": delta, "finish_reason": reason}, True)
        return self._wrap({"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}, True)

    def usage_chunk(self, done: Done) -> dict:
        return {**self._wrap({}, True), "choices": [], "usage": self.usage(done)}


def daemon_error(msg: Error) -> HttpError:
    code = msg.kind  # error_codes.ErrorCode: one HTTP status and OpenAI type per code
    return HttpError(code.http_status, msg.message, code.openai_type)


class Api:
    """The HTTP side of one daemon: `connection` serves one client (the daemon runs it on its listeners).
    `daemon`: the "host:port" to send Generates to (its own)."""

    def __init__(self, daemon: str, model: str, timeouts: Any, ctx: int = DEFAULT_CTX):
        self.daemon, self.model, self.t, self.ctx = daemon, model, timeouts, ctx

    async def connection(self, stream: trio.SocketStream) -> None:
        try:
            try:
                req = await read_request(stream)
                await self.route(stream, req)
            except HttpError as e:
                log.info("API: %d %s", e.status, e.message)
                await send_json(stream, e.status, error_body(e))
        except (ClientGone, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("API: unexpected failure; closing the connection")
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def route(self, stream: trio.abc.Stream, req: HttpRequest) -> None:
        routes = {"/health": ("GET", None), "/v1/models": ("GET", None),
                  "/v1/chat/completions": ("POST", "chat"), "/v1/completions": ("POST", "completion")}
        if req.path not in routes:
            raise HttpError(404, f"no such endpoint {req.path[:80]!r} (see /v1/models, /v1/chat/completions, "
                                 "/v1/completions)", "not_found_error")
        method, kind = routes[req.path]
        if req.method != method:
            raise HttpError(405, f"{req.path} takes {method}, not {req.method}")
        if req.path == "/health":
            await send_json(stream, 200, {"status": "ok"})
        elif req.path == "/v1/models":
            await send_json(stream, 200, {"object": "list", "data": [
                {"id": self.model, "object": "model", "created": 0, "owned_by": "dllp2p"}]})
        else:
            try:
                body = json.loads(req.body)
            except (ValueError, UnicodeDecodeError) as e:
                raise HttpError(400, f"the request body is not JSON: {e}") from None
            g, opts = to_generate(kind, body, self.ctx)
            await self.complete(stream, g, Answer(opts, self.model))

    async def complete(self, stream: trio.abc.Stream, g: Generate, answer: Answer) -> None:
        """Send g to the daemon and answer: whole, or as server-sent events once the first piece is in
        (so an Error before any text still gets its HTTP status)."""
        try:
            link = await open_link(self.daemon, self.t.hello)
        except (LinkClosed, LinkTimeout) as e:
            raise HttpError(503, f"the daemon is unreachable: {e}", "server_error") from None
        try:
            await link.send(g)
            if not answer.opts.stream:
                text = []
                while not isinstance(msg := await self._next(link), Done):
                    text.append(msg.text)
                await send_json(stream, 200, answer.whole("".join(text), msg))
                return
            first = await self._next(link)
            await stream.send_all(head(200, "text/event-stream"))
            if answer.opts.kind == "chat":
                await stream.send_all(event(answer.chunk(None, role=True)))
            msg = first
            try:
                while isinstance(msg, TokenChunk):
                    await stream.send_all(event(answer.chunk(msg.text)))
                    msg = await self._next(link)
            except HttpError as e:  # the status line is gone: the error goes as an event
                await stream.send_all(event(error_body(e)) + event(b"[DONE]"))
                return
            await stream.send_all(event(answer.chunk(None, FINISH.get(msg.stop_reason, "stop"))))
            if answer.opts.include_usage:
                await stream.send_all(event(answer.usage_chunk(msg)))
            await stream.send_all(event(b"[DONE]"))
        finally:
            await link.aclose()  # before Done: the root stops at its next token

    async def _next(self, link: TrioLink) -> TokenChunk | Done:
        try:
            msg = await link.receive(self.t.build)
        except (LinkClosed, LinkTimeout, ProtocolError) as e:
            raise HttpError(500, f"the daemon failed: {e}", "server_error") from None
        if isinstance(msg, Error):
            raise daemon_error(msg)
        if not isinstance(msg, (TokenChunk, Done)):
            raise HttpError(500, f"the daemon answered with {type(msg).__name__}", "server_error")
        return msg


async def start(nursery: trio.Nursery, address: str, daemon: str, model: str, timeouts: Any) -> str | None:
    """Serve the API on `address` in nursery, sending its prompts to the daemon at `daemon`. -> the bound
    "host:port", or None (logged) when it cannot listen there (the port taken by another daemon on this
    machine): the daemon serves on without it."""
    host, port = listen_address(address)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as e:
        log.warning("the HTTP API is off: cannot listen on %s: %s", address, e.strerror or e)
        return None
    bound = format_address(*listeners[0].socket.getsockname()[:2])
    log.info("OpenAI-compatible API on http://%s/v1", bound)
    nursery.start_soon(trio.serve_listeners, Api(daemon, model, timeouts).connection, listeners)
    return bound
