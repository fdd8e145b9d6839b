"""Chat formatting with the model's own Jinja2 template (`tokenizer.chat_template`), sandboxed.

Templates are rendered the way HF transformers' `apply_chat_template` renders them, since that is what
model authors write them against: an immutable sandbox with trim_blocks and lstrip_blocks, the
loop-controls extension (`{% break %}`, `{% continue %}`), `raise_exception(message)`,
`strftime_now(format)`, a `tojson` filter that is plain `json.dumps` (no HTML escaping, non-ASCII kept,
`indent` / `separators` / `sort_keys` accepted), a `namespace` that refuses underscore attributes, and
the variables messages, tools, documents, add_generation_prompt, bos_token, eos_token (and unk/pad).

A file without a template still chats when its family's turn format is known: see FAMILY_TEMPLATES.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping, Sequence


class ChatTemplateError(Exception):
    """The model's chat template is missing or fails to render."""


@dataclass(frozen=True)
class Message:
    role: str  # "system", "user" or "assistant"
    content: str


# Gemma's turn format, written for this project (the Gemma 3 270M GGUF carries no tokenizer.chat_template).
# It follows the format Google documents for Gemma and uses in the template shipped with its HF
# repositories: turns are '<start_of_turn>{user|model}\n' + text + '<end_of_turn>\n', the assistant's role
# is called 'model', the text is trimmed, there is no system turn (a leading system message is folded into
# the first user turn, followed by a blank line), and the reply starts after '<start_of_turn>model\n'.
# `<end_of_turn>` is a control token, so tokenizer.Tokenizer puts it among the end-of-generation ids.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(prefix='') -%}"
    "{%- for m in messages -%}"
    "{%- if loop.first and m['role'] == 'system' -%}"
    "{%- set ns.prefix = m['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n'"
    " + ns.prefix + m['content'] | trim + '<end_of_turn>\n' }}"
    "{%- set ns.prefix = '' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# general.architecture -> the template used when the file has none
FAMILY_TEMPLATES: dict[str, str] = dict.fromkeys(("gemma", "gemma2", "gemma3"), GEMMA_TEMPLATE)


def template_from(metadata: Mapping[str, Any]) -> str | None:
    """The file's own chat template, else its family's (FAMILY_TEMPLATES), else None."""
    return metadata.get("tokenizer.chat_template") or FAMILY_TEMPLATES.get(
        str(metadata.get("general.architecture", ""))
    )


def _raise(message: str) -> None:
    raise ChatTemplateError(f"chat template: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """HF's tojson: json.dumps as is. Jinja's own filter would HTML-escape '<', '>', '&' and quotes."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=1)
def _environment():
    # imported here, not at the top: jinja2 costs ~40 ms and only chat needs it
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.exceptions import SecurityError
    from jinja2.utils import Namespace

    class SafeNamespace(Namespace):
        """`namespace(...)` whose attributes cannot be underscore names (a way towards Python internals)."""

        def __init__(*args: Any, **kwargs: Any) -> None:  # Namespace's own signature trick: `self` may be a key
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                SafeNamespace._check(name)
            Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            SafeNamespace._check(name)
            Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(f"a namespace attribute may not start with '_': {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = SafeNamespace
    return env


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    return _environment().from_string(template)


def _message_dict(m: Message | Mapping[str, Any]) -> dict[str, Any]:
    return {"role": m.role, "content": m.content} if isinstance(m, Message) else dict(m)


def render_chat(
    template: str | None,
    messages: Sequence[Message | Mapping[str, Any]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    **variables: Any,
) -> str:
    """The prompt text for `messages`, ending where the assistant's reply begins. Messages may be
    Message or plain dicts (e.g. with tool_calls); `variables` reach the template as they are."""
    if not template:
        raise ChatTemplateError("the model has no chat template (tokenizer.chat_template); run without --chat")
    from jinja2 import TemplateError

    try:
        return _compiled(template).render(
            messages=[_message_dict(m) for m in messages],
            tools=None if tools is None else [dict(t) for t in tools],
            documents=None,
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except ChatTemplateError:
        raise
    except TemplateError as e:
        raise ChatTemplateError(f"chat template failed to render: {e}") from None


# Unicode noncharacters (never in interchange text) that bracket each message's content while the template
# renders, so the rendered text knows which characters came from a message: see render_chat_spans.
OPEN, CLOSE = "\ufdd0", "\ufdd1"


def _bracketed(content: Any) -> Any:
    """content with OPEN/CLOSE around its text, outside its leading and trailing whitespace (a template's
    `| trim` still trims it); markers the content itself holds are removed first."""
    if not isinstance(content, str):
        return content
    content = content.replace(OPEN, "").replace(CLOSE, "")
    core = content.strip()
    if not core:
        return content
    head = content[: len(content) - len(content.lstrip())]
    tail = content[len(content.rstrip()):]
    return f"{head}{OPEN}{core}{CLOSE}{tail}"


def render_chat_spans(template: str | None, messages: Sequence[Message | Mapping[str, Any]],
                      **kwargs: Any) -> tuple[str, list[tuple[int, int]]]:
    """render_chat, and the [start, end) spans of the result that are message content: the tokenizer
    reads those as text, never as control tokens (a user typing '<|im_start|>system' forges no turn).

    The contents are bracketed with OPEN/CLOSE and the markers are taken out of the rendered text. A
    template that cuts a content apart (e.g. keeps what follows '</think>' of an assistant turn) leaves
    the markers unpaired: then only system and user contents are bracketed, and if that fails too the
    template cannot be told from its contents and ChatTemplateError says so."""
    dicts = [_message_dict(m) for m in messages]
    for roles in (None, ("system", "user")):
        marked = [{**d, "content": _bracketed(d.get("content"))} if roles is None or d.get("role") in roles else d
                  for d in dicts]
        spans = _unbracket(render_chat(template, marked, **kwargs))
        if spans is not None:
            return spans
    raise ChatTemplateError("chat template: cannot tell the messages' contents apart from the template's markup")


def _unbracket(text: str) -> tuple[str, list[tuple[int, int]]] | None:
    """(text without OPEN/CLOSE, the spans they enclosed), or None if they are not in OPEN, CLOSE pairs."""
    markers = re.sub(f"[^{OPEN}{CLOSE}]+", "", text)
    if markers != (OPEN + CLOSE) * (len(markers) // 2):
        return None
    parts = text.replace(CLOSE, OPEN).split(OPEN)
    pos, spans = 0, []
    for i, part in enumerate(parts):
        if i % 2 == 1:
            spans.append((pos, pos + len(part)))
        pos += len(part)
    return "".join(parts), spans


def chat_messages(prompt: str, system: str | None = None) -> list[Message]:
    msgs = [Message("system", system)] if system else []
    return msgs + [Message("user", prompt)]
