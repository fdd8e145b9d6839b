"""ErrorCode: one HTTP status and OpenAI type per code; codes cross the wire as plain strings; who sends
which (a forward to a dead root: unreachable; the root's refusals; the CLI line with the code's hint)."""

import dataclasses
import socket

import pytest

from dllp2p import wire as P
from dllp2p.error_codes import CodedError, ErrorCode, code_of
from dllp2p.engine import ContextFull


def _roundtrip(msg):
    frame = P.encode(msg)
    _, _, kind, _ = P.HEADER.unpack(frame[:P.HEADER_SIZE])
    return P.decode_body(kind, frame[P.HEADER_SIZE:])


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_code_crosses_the_wire_and_has_an_http_status(code):
    back = _roundtrip(P.Error(code, "why"))
    assert type(back.code) is str and back.code == code.value and back.kind is code
    assert 400 <= code.http_status < 600
    assert code.openai_type == ("invalid_request_error" if code.http_status < 500 else "server_error")


def test_the_statuses_clients_rely_on():
    assert ErrorCode.BUSY.http_status == ErrorCode.UNREACHABLE.http_status == 503
    assert ErrorCode.CONTEXT_LENGTH.http_status == ErrorCode.INVALID_TOKEN.http_status == 400
    assert ErrorCode.GENERATE.http_status == ErrorCode.PEER_LOST.http_status == 500


def test_a_code_from_a_newer_peer_reads_as_other():
    back = _roundtrip(P.Error("some_future_code", "why"))
    assert back.code == "some_future_code" and back.kind is ErrorCode.OTHER and back.kind.http_status == 500


def test_protocol_errors_map_to_codes():
    assert P.error_code(P.SliceHashMismatch("x")) is ErrorCode.SLICE_HASH
    assert P.error_code(P.ProtocolError("x")) is ErrorCode.PROTOCOL


def test_code_of_exceptions():
    assert code_of(ContextFull("full")) is ErrorCode.CONTEXT_LENGTH
    assert code_of(CodedError("bad id", ErrorCode.INVALID_TOKEN)) is ErrorCode.INVALID_TOKEN
    assert code_of(CodedError("refused")) is ErrorCode.INVALID_REQUEST
    assert code_of(ValueError("x")) is ErrorCode.GENERATE
    assert code_of(OSError("x"), ErrorCode.ENGINE) is ErrorCode.ENGINE


# --- who sends which code ------------------------------------------------------------------------------


class Sink:
    """A link stand-in that keeps what is sent to it."""

    peer = "test"

    def __init__(self):
        self.sent = []

    async def send(self, msg):
        self.sent.append(msg)


def _generate(**kw):
    from dllp2p.wire.client import daemon_request
    from dllp2p.sampler import SamplerConfig

    return daemon_request(SamplerConfig(temperature=0), 4, 64, prompt="hi", **kw)


def test_forward_to_a_root_that_does_not_answer_says_unreachable():
    """Was "generate" (so the HTTP API's 503 for unreachable was never sent: clients got 500)."""
    import trio

    from dllp2p.config import Timeouts
    from dllp2p.session import forwarding as serve

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    sink = Sink()
    # the root is lost before it took the request: nothing is sent yet; the prompt slot (daemon/prompts.py)
    # takes the root out of the membership and hands the request to the next one, or says UNREACHABLE
    lost = trio.run(serve.forward, sink, _generate(), dead, "me", Timeouts(hello=2.0))
    assert isinstance(lost, serve.RootLost) and lost.already == () and not lost.left and sink.sent == []
    assert ErrorCode.UNREACHABLE.http_status == 503
    sink = Sink()
    trio.run(serve.forward, sink, dataclasses.replace(_generate(), hops=P.MAX_HOPS), dead, "me", Timeouts())
    assert sink.sent[0].kind is ErrorCode.FORWARD_LOOP


@pytest.mark.parametrize("ids,vocab,ctx,code", [([1, 2, 3], 10, 8, None), ([1, 10], 10, 8, ErrorCode.INVALID_TOKEN),
                                                ([1] * 8, 10, 8, ErrorCode.CONTEXT_LENGTH),
                                                ([1] * 7, 10, 8, None)])
def test_the_root_refuses_what_the_client_got_wrong(ids, vocab, ctx, code):
    from dllp2p.session.admission import check_prompt as _check_prompt

    if code is None:
        _check_prompt(ids, vocab, ctx)
        return
    with pytest.raises(CodedError) as e:
        _check_prompt(ids, vocab, ctx)
    assert e.value.code is code and e.value.code.http_status == 400


def test_the_cli_line_ends_with_the_codes_hint():
    """wire.client.ask_blocking against a daemon stand-in that answers the client's Status probe, then its
    Generate with Error(busy)."""
    import threading

    from dllp2p.wire.client import DaemonError, ask_blocking

    with socket.create_server(("127.0.0.1", 0)) as server:
        def answer():
            for reply in (P.StatusReply(0, "x", (), None, None, 0), P.Error(ErrorCode.BUSY, "node x is busy")):
                conn, _ = server.accept()
                with conn:
                    conn.recv(1 << 16)
                    conn.sendall(P.encode(reply))

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        with pytest.raises(DaemonError) as e:
            ask_blocking(address, _generate(), lambda text: None)
        t.join(5)
    assert e.value.code is ErrorCode.BUSY
    assert str(e.value) == f"daemon {address}: node x is busy ({ErrorCode.BUSY.hint})"
