"""The OpenAI request and answer shapes, pure: request body bytes -> checked JSON -> protocol.Generate, and
the root's TokenChunk ... Done -> chat.completion[.chunk] / text_completion JSON. No I/O (api.py moves
the bytes).

Every field a request may carry is in one of three lists: what we implement (IMPLEMENTED), what is
harmless to accept and ignore (IGNORED: it changes nothing in the answer), and what we do not
implement but accept at its neutral value (NEUTRAL: n=1, logprobs=false, tools=[], ...). Anything
else (tools, tool_choice, response_format, grammar, logit_bias, a field we have never heard of) is a
400 `unsupported_parameter` naming it: never silently ignored. null is "not given" for every field.

Sampling: temperature (default 1, as OpenAI's), top_p (default 1), seed, max_tokens (or
max_completion_tokens; default 256, at most ctx - 1), stop (up to 4 strings of up to 256 characters);
beyond OpenAI's fields, top_k, min_p and repeat_penalty as `dllp2p run` has them (defaults 40, 0.05, 1).
A completion's prompt may be token ids (each in 0..2^31-1 here; the root checks them against the
model's vocabulary: invalid_token).

Error handling: every problem is a CodedError (error_codes) whose `param` names the field.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Mapping

from .error_codes import CodedError, ErrorCode
from .wire.codec import ProtocolError
from .wire.messages import CHAT_ROLES, ChatTurn, Done, Generate
from .sampler import SamplerConfig

MAX_STOP = 4  # stop strings per request, as OpenAI's
MAX_STOP_CHARS = 256  # characters of one stop string (protocol.Generate's limit)
MAX_TOKEN_ID = (1 << 31) - 1  # a prompt's token ids (the root checks the model's vocabulary)
DEFAULT_MAX_TOKENS = 256  # as `dllp2p run --steps`
DEFAULT_CTX = 2048  # as `dllp2p run --ctx`
MAX_JSON_DEPTH = 32  # nesting of arrays and objects in a request body
FINISH = {"eos": "stop", "stop": "stop", "steps": "length", "context": "length"}  # GenerationStats.stop_reason

_SAMPLING = ("temperature", "top_p", "seed", "stop", "stream", "stream_options", "top_k", "min_p", "repeat_penalty",
             "max_tokens")
IMPLEMENTED = {"chat": frozenset(("messages", "max_completion_tokens", *_SAMPLING)),
               "completion": frozenset(("prompt", *_SAMPLING))}
IGNORED = frozenset(("model", "user", "metadata", "store", "service_tier"))  # nothing in the answer depends on them
NEUTRAL: dict[str, tuple[Any, ...]] = {  # accepted only at these values (compared with their types)
    "n": (1,), "best_of": (1,), "logprobs": (False,), "top_logprobs": (0,), "echo": (False,), "suffix": ("",),
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},), "tools": ([],),
    "functions": ([],), "modalities": (["text"],), "parallel_tool_calls": (False, True),
}
_NOT_SUPPORTED_HINT = {"frequency_penalty": "; repeat_penalty (llama.cpp's, e.g. 1.1) is",
                       "presence_penalty": "; repeat_penalty (llama.cpp's, e.g. 1.1) is"}


def bad(message: str, param: str | None = None, code: ErrorCode = ErrorCode.INVALID_VALUE) -> CodedError:
    return CodedError(message, code, param)


# --- body bytes -> JSON ----------------------------------------------------------------------------------

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays/objects in JSON text (strings skipped); a cheap scan before parsing,
    since the parser recurses once per level."""
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub(b"", data)):
        depth += 1 if m.group() in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(data: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A request body -> its JSON value. Raises CodedError(INVALID_JSON): not UTF-8, not JSON, NaN or
    Infinity, nested deeper than max_depth, a number of thousands of digits, a lone surrogate."""
    if json_depth(data) > max_depth:
        raise bad(f"the request body nests arrays/objects deeper than {max_depth} levels", None, ErrorCode.INVALID_JSON)
    try:
        value = json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and int()'s digit limit are ValueErrors
        raise bad(f"the request body is not JSON: {e}", None, ErrorCode.INVALID_JSON) from None
    _check_strings(value, "")
    return value


def _check_strings(value: Any, where: str) -> None:
    """Every string (keys too) encodable as UTF-8: JSON's \\ud800 escapes decode to lone surrogates."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise bad(f"{where or 'the body'} holds a lone UTF-16 surrogate (not a character)", where or None,
                      ErrorCode.INVALID_JSON) from None
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_strings(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k, where)
            _check_strings(v, f"{where}.{k}" if where else k)


# --- JSON -> Generate ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """What the answer needs besides the Generate."""

    kind: str  # "chat" or "completion"
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last event with the token counts


def _same(a: Any, b: Any) -> bool:
    """a == b with types (so True is not 1 and 0.0 not False)."""
    if type(a) is not type(b) and not (type(a) in (int, float) and type(b) in (int, float)):
        return False
    return a == b


def check_fields(kind: str, body: Mapping[str, Any]) -> None:
    """Refuse any field we do not implement (at a value other than its neutral one) by name."""
    for key, value in body.items():
        if value is None or key in IMPLEMENTED[kind] or key in IGNORED:
            continue
        if key in NEUTRAL:
            if any(_same(value, ok) for ok in NEUTRAL[key]):
                continue
            raise bad(f"{key}={json.dumps(value)[:40]} is not supported{_NOT_SUPPORTED_HINT.get(key, '')} "
                      f"(only {' or '.join(json.dumps(v) for v in NEUTRAL[key])})", key, ErrorCode.UNSUPPORTED)
        raise bad(f"{key} is not supported by this server", key, ErrorCode.UNSUPPORTED)


def _number(body: Mapping[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise bad(f"{key} must be a number in [{lo:g}, {hi:g}], not {json.dumps(v)[:40]}", key)
    return float(v)


def _integer(body: Mapping[str, Any], key: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise bad(f"{key} must be a whole number in [{lo}, {hi}], not {json.dumps(v)[:40]}", key)
    return v


def _flag(body: Mapping[str, Any], key: str) -> bool:
    v = body.get(key)
    if v is not None and not isinstance(v, bool):
        raise bad(f"{key} must be true or false", key)
    return bool(v)


def _text_content(content: Any, where: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and set(p) <= {"type", "text"}
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise bad(f"{where}.content must be a string or a list of text parts (this model reads text only)",
              f"{where}.content")


def _messages(body: Mapping[str, Any]) -> tuple[ChatTurn, ...]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages must be a non-empty list", "messages")
    turns = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object", where)
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in CHAT_ROLES:
            raise bad(f"{where}.role must be one of {', '.join(CHAT_ROLES)} (or developer), not "
                      f"{json.dumps(m.get('role'))[:40]}", f"{where}.role")
        extra = sorted(k for k, v in m.items() if k not in ("role", "content", "name") and v is not None)
        if extra:
            raise bad(f"{where}.{extra[0]} is not supported by this server", f"{where}.{extra[0]}", ErrorCode.UNSUPPORTED)
        if m.get("name") is not None and not isinstance(m["name"], str):
            raise bad(f"{where}.name must be a string", f"{where}.name")
        turns.append(ChatTurn(role, _text_content(m.get("content"), where)))
    return tuple(turns)


def _prompt(body: Mapping[str, Any]) -> tuple[str, tuple[int, ...]]:
    """A completion's prompt: text, a list of one text, or token ids."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str) and p:
        return p, ()
    if isinstance(p, list) and p and all(type(t) is int for t in p):
        if not all(0 <= t <= MAX_TOKEN_ID for t in p):
            t = next(t for t in p if not 0 <= t <= MAX_TOKEN_ID)
            raise bad(f"token id {t} in prompt is out of range", "prompt", ErrorCode.INVALID_TOKEN)
        return "", tuple(p)
    raise bad("prompt must be a non-empty string (or one such string in a list, or a list of token ids)", "prompt")


def _stops(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise bad(f"stop must be a string or a list of up to {MAX_STOP} of them, each of 1-{MAX_STOP_CHARS} "
                  "characters", "stop")
    return tuple(stops)


def to_generate(kind: str, body: Any, ctx: int = DEFAULT_CTX) -> tuple[Generate, Options]:
    """An OpenAI request body (parsed JSON) -> (the Generate for the root, answer options). Pure; raises
    CodedError naming the first bad field."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    check_fields(kind, body)
    for key in ("model", "user"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise bad(f"{key} must be a string", key)
    stream = _flag(body, "stream")
    so = body.get("stream_options")
    if so is not None and (not isinstance(so, dict) or not set(so) <= {"include_usage"}):
        raise bad('stream_options must be an object with only "include_usage"', "stream_options")
    include_usage = _flag(so or {}, "include_usage")
    steps_key = "max_completion_tokens" if kind == "chat" and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    steps = _integer(body, steps_key, min(DEFAULT_MAX_TOKENS, ctx - 1), 1, ctx - 1)
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
    stop = _stops(body)
    try:
        g = Generate(prompt, tokens, False, None, steps, ctx, float(sampler.temperature), sampler.top_k,
                     float(sampler.top_p), float(sampler.min_p), float(sampler.repeat_penalty), sampler.seed,
                     messages=messages, stop=stop)
    except ProtocolError as e:  # pragma: no cover - every field is checked above
        raise bad(str(e)) from None
    return g, Options(kind, stream, include_usage)


# --- the answer ------------------------------------------------------------------------------------------


def error_body(e: CodedError) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": str(e), "type": e.code.openai_type, "param": e.param, "code": e.code.value}}


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
                "total_tokens": done.prompt_tokens + done.generated_tokens,
                "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}

    def whole(self, text: str, done: Done) -> dict:
        reason = FINISH.get(done.stop_reason, "stop")
        if self.opts.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {**self._wrap(choice, False), "usage": self.usage(done)}

    def chunk(self, text: str | None, reason: str | None = None, role: bool = False) -> dict:
        if self.opts.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            return self._wrap({"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}, True)
        return self._wrap({"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}, True)

    def usage_chunk(self, done: Done) -> dict:
        return {**self._wrap({}, True), "choices": [], "usage": self.usage(done)}


def event(obj: Any) -> bytes:
    """One server-sent event."""
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
