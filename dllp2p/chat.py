"""Chat formatting with the model's own Jinja2 template (`tokenizer.chat_template`), sandboxed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence


class ChatTemplateError(Exception):
    """The model's chat template is missing or fails to render."""


@dataclass(frozen=True)
class Message:
    role: str  # "system", "user" or "assistant"
    content: str


def _raise(message: str) -> None:
    raise ChatTemplateError(f"chat template: {message}")


def render_chat(
    template: str | None,
    messages: Sequence[Message],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text for `messages`, ending where the assistant's reply begins."""
    if not template:
        raise ChatTemplateError("the model has no chat template (tokenizer.chat_template); run without --chat")
    # imported here, not at the top: jinja2 costs ~40 ms and only --chat needs it
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    try:
        compiled = env.from_string(template)
        return compiled.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
        )
    except TemplateError as e:
        raise ChatTemplateError(f"chat template failed to render: {e}") from None


def chat_messages(prompt: str, system: str | None = None) -> list[Message]:
    msgs = [Message("system", system)] if system else []
    return msgs + [Message("user", prompt)]


def template_from(metadata: Mapping[str, Any]) -> str | None:
    return metadata.get("tokenizer.chat_template")
