"""An OpenAI-compatible HTTP API, served by a daemon: the cluster behind the endpoints chat clients and
libraries already speak.

    dllp2p daemon --api 127.0.0.1:7341 [--api-ctx 2048]
    curl http://127.0.0.1:7341/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'

    POST /v1/chat/completions   messages -> the model's chat template; "stream": true for server-sent events
    POST /v1/completions        prompt (text, or token ids) as it is
    GET  /v1/models             the model this daemon serves as root ("model" in a request is not checked)
    GET  /v1/models/{id}        that model, or 404
    GET  /health
    OPTIONS *                   CORS preflight (204)

HTTP/1.1 is h11's (sans-IO: it turns bytes into events and back; this module moves the bytes over trio
streams). h11 rather than hypercorn: a small pure-Python state machine with no event loop or worker of
its own, so the limits below are ours and one connection is one trio task. Keep-alive: a connection
serves request after request until the client closes it, is silent for Limits.idle seconds between
requests, or a protocol error leaves it unusable (then the error response says `Connection: close`).
Request bodies come with Content-Length or chunked.

Data flow of a request: bytes -> h11 events -> an HttpRequest (head and body within Limits) -> a route ->
api_schema (JSON -> protocol.Generate, every field checked; fields we do not implement refused by
name) -> `submit`, the daemon's own handler of a Generate, called in this process (it serves the
prompt as root or forwards it to the root, exactly as for `dllp2p run`'s connection), answering
through an _Answers sink -> TokenChunk ... Done -> the OpenAI answer, whole or one event per chunk. A
client that goes away closes the sink: the root stops at its next token.

Host and CORS (api_access.py): a request whose Host names neither an IP literal, localhost, nor a name
this API answers to (the listen host, config `api_hosts`) gets 421 (DNS rebinding); browsers may call the
API from pages served on loopback origins only; any other Origin gets 403 (a page elsewhere must not
drive the cluster of whoever visits it, even with a "simple" request that needs no preflight).

Error handling: every client mistake is an error_codes.CodedError answered with its HTTP status in
OpenAI's error shape {"error": {"message", "type", "param", "code"}}, logged as one line at info (a 429,
rate_limit_exceeded: every batch slot of the root runs and its queue is full, with Retry-After), and
the connection serves on (or is closed after the response where HTTP requires it: a malformed head, a
body not read); the root's Error frame maps through its ErrorCode the same way. Anything else is a bug:
logged with its traceback, answered 500 if nothing was sent yet.

Authentication: on loopback (the default) none. Listening anywhere else needs the cluster key: every
request but a CORS preflight must carry `Authorization: Bearer <ClusterKey.api_token>` (`dllp2p key show
--api-token`; OpenAI clients' api_key), else 401 invalid_api_key in OpenAI's error shape. A daemon without
a key does not serve the API beyond loopback at all.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Awaitable, Callable, Mapping

import h11
import trio

from .api_access import bearer_ok, cors_headers, host_allowed, is_loopback, local_names, origin_allowed, preflight_headers
from .api_schema import DEFAULT_CTX, FINISH, MAX_JSON_DEPTH, Answer, error_body, event, parse_json, to_generate
from .error_codes import RETRY_AFTER_S, CodedError, ErrorCode
from .wire.link import LinkClosed, format_address, parse_address
from .wire.messages import Done, Error, Generate, TokenChunk

log = logging.getLogger("dllp2p.api")

SERVER = "dllp2p"


@dataclass(frozen=True)
class Limits:
    """What one client may send. Seconds and bytes."""

    max_head: int = 16 << 10  # request line + headers
    max_headers: int = 64  # header lines
    max_body: int = 1 << 20  # body, after any chunked framing
    max_json_depth: int = MAX_JSON_DEPTH
    read_timeout: float = 30.0  # from a request's first byte to its last (slow clients: 408)
    idle: float = 120.0  # a kept-alive connection waiting for its next request
    max_connections: int = 64  # open at once; the next gets 503 and is closed
    ctx: int = DEFAULT_CTX  # the context (KV positions) of the API's requests


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str  # without the query
    headers: Mapping[str, str]  # names in lower case, latin-1 decoded; a repeated header's values joined by ", "
    body: bytes


Submit = Callable[[Any, Generate], Awaitable[None]]  # (sink with .peer and async .send(msg), g) -> None


def listen_address(address: str) -> tuple[str, int]:
    """'host:port' to listen on (port 0: any free one) -> (host, port). Raises ValueError."""
    return parse_address(address, listen=True)


def http_error(code: ErrorCode, message: str) -> CodedError:
    return CodedError(message, code)


# --- one connection --------------------------------------------------------------------------------------


class _Close(Exception):
    """The connection ends here, with no response (the client went away or stayed silent)."""


class _Answers:
    """The sink `submit` answers on, as on a link: send() hands each message to the HTTP side; once that
    side has stopped listening, send raises LinkClosed (the root then stops generating)."""

    def __init__(self, peer: str):
        self.peer = peer
        self.send_channel, self.receive_channel = trio.open_memory_channel[Any](16)

    async def send(self, msg: Any) -> None:
        try:
            await self.send_channel.send(msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise LinkClosed(f"{self.peer}: the HTTP client is gone") from None


class Connection:
    """One client's connection: h11 state plus the stream; requests read and answered one at a time."""

    def __init__(self, stream: trio.abc.Stream, limits: Limits, peer: str):
        self.stream, self.limits, self.peer = stream, limits, peer
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head)
        self.origin: str | None = None  # of the request being answered (CORS)
        self.head_only = False  # the request being answered is a HEAD: headers, no body
        self.deadline: float | None = None  # trio time by which the request being read must be in
        self.cors: list[tuple[str, str]] = []

    def _started(self) -> None:
        """A request's first byte is in: from now on it has Limits.read_timeout to arrive whole."""
        if self.deadline is None:
            self.deadline = trio.current_time() + self.limits.read_timeout

    async def _next_event(self) -> Any:
        """The next h11 event, waiting for bytes (before a request: up to Limits.idle, then _Close; once
        it has begun: until its deadline, then 408). Raises CodedError (h11's complaint), _Close."""
        while True:
            try:
                ev = self.h11.next_event()
            except h11.RemoteProtocolError as e:
                code = ErrorCode.HEAD_TOO_LARGE if e.error_status_hint == 431 else ErrorCode.BAD_HTTP
                raise http_error(code, f"malformed HTTP request: {e}") from None
            if ev is not h11.NEED_DATA:
                return ev
            wait = trio.current_time() + self.limits.idle if self.deadline is None else self.deadline
            with trio.move_on_at(wait):
                data = await self.stream.receive_some(1 << 16)
                if data:
                    self._started()
                self.h11.receive_data(data)  # b"": the client closed its side
                continue
            if self.deadline is None:  # silence between requests ends the connection without a word
                raise _Close()
            raise http_error(ErrorCode.TIMEOUT, f"the request was not sent within {self.limits.read_timeout:g} s")

    async def watch_for_close(self, gone: trio.Event, scope: trio.CancelScope) -> None:
        """While a whole answer is made: what the client sends goes to h11 (a pipelined request, up to
        one request's limits); its close or reset sets `gone` and cancels `scope`."""
        taken = 0
        while taken <= self.limits.max_head + self.limits.max_body:
            try:
                data = await self.stream.receive_some(1 << 16)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                gone.set()
                scope.cancel()
                return
            taken += len(data)
            self.h11.receive_data(data)

    async def read_request(self) -> HttpRequest | None:
        """The next whole request, or None when the client closed the connection between requests.
        Raises CodedError (then the connection must close after answering), _Close."""
        self.deadline = None
        if self.h11.trailing_data[0]:  # a pipelined request's bytes, already here
            self._started()
        ev = await self._next_event()
        if isinstance(ev, h11.ConnectionClosed):
            return None
        if not isinstance(ev, h11.Request):  # pragma: no cover - h11 begins every cycle with a Request
            raise http_error(ErrorCode.BAD_HTTP, f"unexpected {type(ev).__name__}")
        req = self._head(ev)
        length = req.headers.get("content-length")
        if length is not None and int(length) > self.limits.max_body:  # h11 checked: ASCII digits, <= 20
            raise http_error(ErrorCode.BODY_TOO_LARGE, f"request body of {length} bytes is over {self.limits.max_body}")
        if self.h11.they_are_waiting_for_100_continue:
            await self.stream.send_all(self.h11.send(h11.InformationalResponse(status_code=100, headers=[])))
        body = bytearray()
        while not isinstance(ev := await self._next_event(), h11.EndOfMessage):
            if isinstance(ev, h11.ConnectionClosed):
                raise _Close()
            body += ev.data
            if len(body) > self.limits.max_body:
                raise http_error(ErrorCode.BODY_TOO_LARGE, f"request body over {self.limits.max_body} bytes")
        return HttpRequest(req.method, req.path, req.headers, bytes(body))

    def _head(self, ev: h11.Request) -> HttpRequest:
        # h11 bounds only a head that arrives in pieces (max_incomplete_event_size); one that came whole
        # in a single read is measured here (as sent, less optional whitespace)
        size = len(ev.method) + len(ev.target) + 12 + sum(len(n) + len(v) + 4 for n, v in ev.headers.raw_items())
        if size > self.limits.max_head:
            raise http_error(ErrorCode.HEAD_TOO_LARGE, f"request head over {self.limits.max_head} bytes")
        if len(ev.headers) > self.limits.max_headers:
            raise http_error(ErrorCode.TOO_MANY_HEADERS, f"over {self.limits.max_headers} header lines")
        headers: dict[str, str] = {}
        for name, value in ev.headers:
            key = name.decode("ascii")  # h11: a token
            headers[key] = f"{headers[key]}, {value.decode('latin-1')}" if key in headers else value.decode("latin-1")
        self.origin = headers.get("origin")
        self.head_only = ev.method == b"HEAD"
        if "content-length" in headers and "transfer-encoding" in headers:
            raise http_error(ErrorCode.BAD_HTTP, "Content-Length and Transfer-Encoding together (request smuggling?)")
        length = headers.get("content-length")
        if length is not None and not (length.isascii() and length.isdigit() and len(length) <= 18):
            raise http_error(ErrorCode.BAD_HTTP, f"Content-Length {length[:24]!r} is not 1-18 ASCII digits")
        target = ev.target.decode("latin-1")  # h11: visible characters
        return HttpRequest(ev.method.decode("ascii").upper(), target.split("?", 1)[0], headers, b"")

    # --- responses ---

    def _headers(self, content_type: str | None, length: int | None, extra: list[tuple[str, str]],
                 close: bool) -> list[tuple[str, str]]:
        out = [("server", SERVER), ("cache-control", "no-cache")]
        if content_type:
            out.append(("content-type", content_type))
        if length is not None:
            out.append(("content-length", str(length)))
        if close:
            out.append(("connection", "close"))
        return out + extra

    async def respond(self, status: int, content_type: str | None, body: bytes, extra: list[tuple[str, str]] = (),
                      close: bool = False) -> None:
        """A whole response."""
        length = None if status == 204 else len(body)
        head = h11.Response(status_code=status, reason=HTTPStatus(status).phrase.encode(),
                            headers=self._headers(content_type, length, [*self.cors, *extra], close))
        data = self.h11.send(head) + (self.h11.send(h11.Data(data=body)) if body and not self.head_only else b"")
        await self.stream.send_all(data + self.h11.send(h11.EndOfMessage()))

    async def send_json(self, status: int, obj: Any, close: bool = False) -> None:
        await self.respond(status, "application/json", json.dumps(obj).encode(), close=close)

    async def start_stream(self, content_type: str) -> None:
        """The head of a response whose body follows in pieces (chunked; HTTP/1.0: until close)."""
        head = h11.Response(status_code=200, reason=b"OK",
                            headers=self._headers(content_type, None, [*self.cors, ("x-accel-buffering", "no")],
                                                  False))
        await self.stream.send_all(self.h11.send(head))

    async def send_piece(self, data: bytes) -> None:
        await self.stream.send_all(self.h11.send(h11.Data(data=data)))

    async def end_stream(self) -> None:
        await self.stream.send_all(self.h11.send(h11.EndOfMessage()))

    async def send_error(self, e: CodedError, close: bool = False) -> None:
        """e as OpenAI's error body with its status, if a response can still begin."""
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            raise _Close()  # a response is under way: nothing more can be said in HTTP
        retry = [("retry-after", str(RETRY_AFTER_S))] if e.code is ErrorCode.RATE_LIMITED else []
        try:
            await self.respond(e.code.http_status, "application/json", json.dumps(error_body(e)).encode(), retry, close)
        except h11.LocalProtocolError:  # no Request parsed yet (a head cut short by the timeout): by hand
            body = json.dumps(error_body(e)).encode()
            status = e.code.http_status
            head = "".join(f"{k}: {v}\r\n" for k, v in self._headers("application/json", len(body), self.cors, True))
            await self.stream.send_all(f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n{head}\r\n".encode() + body)

    def next_cycle(self) -> bool:
        """Ready for the next request on this connection? (h11: both sides DONE, keep-alive)."""
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            self.origin, self.cors, self.head_only = None, [], False
            return True
        return False


# --- the service -----------------------------------------------------------------------------------------


class Api:
    """The HTTP side of one daemon: `connection` serves one client (run on the API's listeners).
    `submit`: the daemon's handler of a Generate (daemon.Daemon._generate), called in this process."""

    def __init__(self, submit: Submit, model: str, limits: Limits = Limits(), token: str | None = None,
                 hosts: frozenset[str] = frozenset()):
        self.submit, self.model, self.limits, self.hosts = submit, model, limits, hosts  # hosts: api_access
        self._token = token  # the bearer key every request must carry; None: none (loopback)
        self.open = 0  # connections being served

    async def connection(self, stream: trio.SocketStream) -> None:
        try:
            peer = format_address(*stream.socket.getpeername()[:2])
        except (OSError, AttributeError):
            peer = "client"
        conn = Connection(stream, self.limits, f"http {peer}")
        self.open += 1
        try:
            if self.open > self.limits.max_connections:
                log.info("API %s: over %d connections; refused", peer, self.limits.max_connections)
                await conn.send_error(CodedError(f"this server has {self.limits.max_connections} connections open; "
                                                 "try again later", ErrorCode.BUSY), close=True)
                return
            await self._serve(conn)
        except (_Close, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("API %s: unexpected failure; closing the connection", peer)
            try:
                await conn.send_error(http_error(ErrorCode.INTERNAL, "internal error (see the daemon's log)"),
                                      close=True)
            except (_Close, trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
                pass
        finally:
            self.open -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _serve(self, conn: Connection) -> None:
        while True:
            try:
                req = await conn.read_request()
            except CodedError as e:  # the request was not read whole: answer, then close
                log.info("API %s: %d %s", conn.peer, e.code.http_status, e)
                conn.cors = cors_headers(conn.origin)
                await conn.send_error(e, close=True)
                return
            if req is None:
                return
            conn.cors = cors_headers(req.headers.get("origin"))
            try:
                await self.route(conn, req)
            except CodedError as e:
                log.info("API %s: %s %s: %d %s", conn.peer, req.method, req.path[:80], e.code.http_status, e)
                await conn.send_error(e)
            if not conn.next_cycle():
                return

    async def route(self, conn: Connection, req: HttpRequest) -> None:
        if not host_allowed(req.headers.get("host"), self.hosts):
            raise CodedError(f"host {req.headers['host'][:80]!r} is not a name of this API (DNS rebinding?); "
                             "add it to the config's api_hosts", ErrorCode.MISDIRECTED)
        if not origin_allowed(req.headers.get("origin")):
            raise CodedError(f"origin {req.headers['origin'][:80]!r} may not use this API (loopback origins only)",
                             ErrorCode.FORBIDDEN_ORIGIN)
        if req.method == "OPTIONS":
            await conn.respond(204, None, b"", preflight_headers(req.headers))
            return
        if self._token is not None and not bearer_ok(req.headers.get("authorization", ""), self._token):
            raise CodedError("a bearer key is required (Authorization: Bearer <the key from `dllp2p key show "
                             "--api-token`>)", ErrorCode.UNAUTHORIZED)
        kinds = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
        if req.path in ("/health", "/v1/models") or req.path.startswith("/v1/models/"):
            if req.method not in ("GET", "HEAD"):
                raise http_error(ErrorCode.METHOD, f"{req.path[:80]} takes GET, not {req.method[:16]}")
            await conn.send_json(200, self.get(req.path))
        elif req.path in kinds:
            if req.method != "POST":
                raise http_error(ErrorCode.METHOD, f"{req.path} takes POST, not {req.method[:16]}")
            g, opts = to_generate(kinds[req.path], parse_json(req.body, self.limits.max_json_depth), self.limits.ctx)
            await self.complete(conn, g, Answer(opts, self.model))
        else:
            raise CodedError(f"no such endpoint {req.path[:80]!r} (see /v1/models, /v1/chat/completions, "
                             "/v1/completions)", ErrorCode.NOT_FOUND)

    def get(self, path: str) -> dict:
        model = {"id": self.model, "object": "model", "created": 0, "owned_by": "dllp2p"}
        if path == "/health":
            return {"status": "ok"}
        if path == "/v1/models":
            return {"object": "list", "data": [model]}
        if path.removeprefix("/v1/models/") != self.model:
            raise CodedError(f"no model {path.removeprefix('/v1/models/')[:80]!r} here; this daemon serves "
                             f"{self.model!r}", ErrorCode.NOT_FOUND, "model")
        return model

    async def complete(self, conn: Connection, g: Generate, answer: Answer) -> None:
        """Hand g to the daemon and answer: whole, or as server-sent events once the first piece is in
        (so an Error before any text still gets its HTTP status)."""
        sink = _Answers(conn.peer)
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._submit, sink, g)
            async with sink.receive_channel:
                try:
                    await self._answer(conn, sink.receive_channel, answer)
                except Exception as e:  # raised after the nursery: the root is not cancelled, it stops
                    failure = e
            # the channel is closed: the root's next send raises LinkClosed and it stops
        if failure is not None:
            raise failure

    async def _submit(self, sink: _Answers, g: Generate) -> None:
        async with sink.send_channel:
            try:
                await self.submit(sink, g)
            except LinkClosed:
                pass

    async def _answer(self, conn: Connection, answers: trio.MemoryReceiveChannel, answer: Answer) -> None:
        if not answer.opts.stream:  # nothing is sent until Done: watch the client, or its leaving goes unseen
            text, gone, failure = [], trio.Event(), None
            async with trio.open_nursery() as watching:
                watching.start_soon(conn.watch_for_close, gone, watching.cancel_scope)
                try:
                    while not isinstance(msg := await _next(answers), Done):
                        text.append(msg.text)
                except CodedError as e:  # raised after the nursery, as itself
                    failure = e
                watching.cancel_scope.cancel()
            if gone.is_set():
                raise _Close()  # closes the answers: the root's next token send fails and it stops
            if failure is not None:
                raise failure
            await conn.send_json(200, answer.whole("".join(text), msg))
            return
        msg = await _next(answers)
        await conn.start_stream("text/event-stream")
        if answer.opts.kind == "chat":
            await conn.send_piece(event(answer.chunk(None, role=True)))
        try:
            while isinstance(msg, TokenChunk):
                await conn.send_piece(event(answer.chunk(msg.text)))
                msg = await _next(answers)
        except CodedError as e:  # the status line is gone: the error goes as an event
            log.info("API %s: %d %s (while streaming)", conn.peer, e.code.http_status, e)
            await conn.send_piece(event(error_body(e)) + event(b"[DONE]"))
            await conn.end_stream()
            return
        await conn.send_piece(event(answer.chunk(None, FINISH.get(msg.stop_reason, "stop"))))
        if answer.opts.include_usage:
            await conn.send_piece(event(answer.usage_chunk(msg)))
        await conn.send_piece(event(b"[DONE]"))
        await conn.end_stream()


async def _next(answers: trio.MemoryReceiveChannel) -> TokenChunk | Done:
    """The daemon's next answer; its Error as a CodedError with the Error's code."""
    try:
        msg = await answers.receive()
    except trio.EndOfChannel:
        raise http_error(ErrorCode.GENERATE, "the daemon ended the request without an answer") from None
    if isinstance(msg, Error):
        raise CodedError(msg.message, msg.kind)
    if not isinstance(msg, (TokenChunk, Done)):
        raise http_error(ErrorCode.GENERATE, f"the daemon answered with {type(msg).__name__}")
    return msg


async def start(nursery: trio.Nursery, address: str, submit: Submit, model: str, limits: Limits = Limits(),
                token: str | None = None, hosts: tuple[str, ...] = ()) -> str | None:
    """Serve the API on `address` in nursery, handing its prompts to `submit` (the daemon's own handler of
    a Generate). -> the bound "host:port", or None (logged) when it cannot listen there (the port taken
    by another daemon on this machine) or may not (beyond loopback without a bearer `token`): the daemon
    serves on without it. On loopback no token is asked for."""
    host, port = listen_address(address)
    if not is_loopback(host):
        if token is None:
            log.warning("the HTTP API is off: %s is beyond loopback and this daemon has no cluster key to take "
                        "its bearer key from (dllp2p key new; or --api 127.0.0.1:PORT)", address)
            return None
    else:
        token = None
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as e:
        log.warning("the HTTP API is off: cannot listen on %s: %s", address, e.strerror or e)
        return None
    bound = format_address(*listeners[0].socket.getsockname()[:2])
    log.info("OpenAI-compatible API on http://%s/v1 (context %d%s)", bound, limits.ctx,
             ", bearer key required: dllp2p key show --api-token" if token else "")
    api = Api(submit, model, limits, token, local_names(host, hosts))
    nursery.start_soon(trio.serve_listeners, api.connection, listeners)
    return bound
