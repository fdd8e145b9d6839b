"""ErrorCode: the one list of named problems, shared by the wire (protocol.Error.code), the HTTP API (each
code -> one HTTP status and OpenAI's error `type`) and the CLI (a hint after the daemon's message).

The lowest layer: it imports nothing from dllp2p, so the wire, the session, the API and the commands all
use it. A code's value is what travels in Error.code (a msgpack string), so values never change once
shipped; a code a newer peer sends that this version does not know reads as OTHER (ErrorCode.parse).

    family        codes                                                     HTTP
    frames        bad_magic version too_large unknown_type malformed_frame  500 (a daemon speaking
                  slice_hash chunk unexpected protocol                          nonsense to another)
    session       busy (503), plan mesh peer_lost engine                    503 / 500
                  disk_full (503: a worker could not store its slices; the root plans without it)
                  leaving (503: a worker shutting down left its session; the root re-plans without it)
    a prompt      generate (the root failed it) 500, unreachable (the root cannot be reached) 503,
                  forward_loop 500, no_model 503, draining 503 (the root is stopping: retry),
                  context_length_exceeded 400, invalid_token 400,
                  invalid_request 400 (a Generate the root refuses), rate_limit_exceeded 429 (every batch
                  slot runs and the queue is full: the API adds Retry-After: RETRY_AFTER_S)
    HTTP only     bad_http 400, invalid_json 400, invalid_value 400, unsupported_parameter 400,
                  invalid_api_key 401, origin_not_allowed 403, not_found 404, method_not_allowed 405, request_timeout 408,
                  body_too_large 413, head_too_large 431, too_many_headers 431, internal_error 500
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    # frames and messages (protocol.error_code maps each ProtocolError subclass to one)
    BAD_MAGIC = "bad_magic"
    VERSION = "version"
    TOO_LARGE = "too_large"
    UNKNOWN_TYPE = "unknown_type"
    MALFORMED_FRAME = "malformed_frame"
    SLICE_HASH = "slice_hash"
    CHUNK = "chunk"
    UNEXPECTED = "unexpected"
    PROTOCOL = "protocol"
    # a root-worker session
    BUSY = "busy"
    PLAN = "plan"
    MESH = "mesh"
    PEER_LOST = "peer_lost"
    ENGINE = "engine"
    DISK_FULL = "disk_full"  # a worker's disk (slice cache) is full: the root leaves it out for a while
    LEAVING = "leaving"  # a worker shutting down (SIGTERM) leaves its session: the root re-plans without it
    # a prompt (Generate)
    GENERATE = "generate"
    UNREACHABLE = "unreachable"
    FORWARD_LOOP = "forward_loop"
    NO_MODEL = "no_model"
    DRAINING = "draining"  # the root is stopping (SIGTERM): it takes no new request; retry (the next root takes it)
    CONTEXT_LENGTH = "context_length_exceeded"  # OpenAI's own code for it
    INVALID_TOKEN = "invalid_token"
    INVALID_REQUEST = "invalid_request"
    RATE_LIMITED = "rate_limit_exceeded"  # the root runs its most requests and its queue is full (OpenAI's code)
    # the HTTP API's own
    BAD_HTTP = "bad_http"
    INVALID_JSON = "invalid_json"
    INVALID_VALUE = "invalid_value"
    UNSUPPORTED = "unsupported_parameter"
    NOT_FOUND = "not_found"
    METHOD = "method_not_allowed"
    TIMEOUT = "request_timeout"
    BODY_TOO_LARGE = "body_too_large"
    HEAD_TOO_LARGE = "head_too_large"
    TOO_MANY_HEADERS = "too_many_headers"
    FORBIDDEN_ORIGIN = "origin_not_allowed"
    MISDIRECTED = "host_not_allowed"  # a Host that is not a name of this API (DNS rebinding)
    UNAUTHORIZED = "invalid_api_key"  # no or a wrong bearer key (the API beyond loopback), as OpenAI names it
    INTERNAL = "internal_error"  # a bug: see the log
    # a code from a newer peer that this version does not know
    OTHER = "other"

    @classmethod
    def parse(cls, code: str) -> ErrorCode:
        """A code off the wire -> its member (OTHER when this version does not know it)."""
        try:
            return cls(code)
        except ValueError:
            return cls.OTHER

    @property
    def http_status(self) -> int:
        return _HTTP.get(self, 500)

    @property
    def openai_type(self) -> str:
        """OpenAI's error `type`: invalid_request_error for the client's mistakes, else server_error."""
        return "invalid_request_error" if self.http_status < 500 else "server_error"

    @property
    def hint(self) -> str:
        """What a person at the CLI can do about it ("" when the message says it all)."""
        return _HINTS.get(self, "")


_HTTP: dict[ErrorCode, int] = {
    ErrorCode.BUSY: 503,
    ErrorCode.DISK_FULL: 503,
    ErrorCode.LEAVING: 503,
    ErrorCode.UNREACHABLE: 503,
    ErrorCode.NO_MODEL: 503,
    ErrorCode.DRAINING: 503,
    ErrorCode.CONTEXT_LENGTH: 400,
    ErrorCode.INVALID_TOKEN: 400,
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.BAD_HTTP: 400,
    ErrorCode.INVALID_JSON: 400,
    ErrorCode.INVALID_VALUE: 400,
    ErrorCode.UNSUPPORTED: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.METHOD: 405,
    ErrorCode.TIMEOUT: 408,
    ErrorCode.BODY_TOO_LARGE: 413,
    ErrorCode.HEAD_TOO_LARGE: 431,
    ErrorCode.TOO_MANY_HEADERS: 431,
    ErrorCode.FORBIDDEN_ORIGIN: 403,
    ErrorCode.MISDIRECTED: 421,
    ErrorCode.UNAUTHORIZED: 401,
}

_HINTS: dict[ErrorCode, str] = {
    ErrorCode.BUSY: "the cluster is serving another prompt; try again when it is done",
    ErrorCode.UNREACHABLE: "the root daemon does not answer; `dllp2p status` shows the members",
    ErrorCode.NO_MODEL: "start the root's daemon with --model PATH",
    ErrorCode.DRAINING: "the root is stopping; send it again in a moment (the next root takes it)",
    ErrorCode.CONTEXT_LENGTH: "raise --ctx or shorten the prompt",
    ErrorCode.RATE_LIMITED: "the root serves its most requests at once and its queue is full; try again shortly "
                            "(or raise the root's max_batch / queue)",
    ErrorCode.VERSION: "run the same dllp2p version on every device",
    ErrorCode.DISK_FULL: "free space on that device (or lower its --cache-mb); `dllp2p status` shows it left out",
}


RETRY_AFTER_S = 5  # what a 429 (rate_limit_exceeded) tells the client to wait, seconds


class CodedError(Exception):
    """An error that names its ErrorCode (`code`), for a boundary to pass on as it is: the root refuses a
    request with one (a prompt over the context: CONTEXT_LENGTH), the HTTP API answers with its status."""

    code: ErrorCode = ErrorCode.INVALID_REQUEST

    def __init__(self, message: str, code: ErrorCode | None = None, param: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.param = param  # the request field at fault, if any (OpenAI's error `param`)


def code_of(e: BaseException, default: ErrorCode = ErrorCode.GENERATE) -> ErrorCode:
    """The code an exception names (a `code` attribute that is an ErrorCode), else default."""
    code = getattr(e, "code", None)
    return code if isinstance(code, ErrorCode) else default
