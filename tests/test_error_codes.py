"""ErrorCode: one HTTP status and OpenAI type per code; codes cross the wire as plain strings."""

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
