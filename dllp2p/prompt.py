"""A prompt -> token ids: plain text, or a conversation in the model's chat template. Shared by every
place a prompt comes in (the commands in this process, the root service for the cluster)."""

from __future__ import annotations

from typing import Sequence

from .chat import Message, chat_messages, render_chat_spans, template_from
from .formats import GGUFModel
from .tokenizer import Tokenizer


def prompt_tokens(tokenizer: Tokenizer, model: GGUFModel, prompt: str, chat: bool, system: str | None) -> list[int]:
    if not chat:
        return tokenizer.encode(prompt)
    return chat_tokens(tokenizer, model, chat_messages(prompt, system))


def chat_tokens(tokenizer: Tokenizer, model: GGUFModel, messages: Sequence[Message]) -> list[int]:
    """A conversation in the model's chat template, ending where the assistant's next reply begins. The
    template's markup becomes control tokens; the messages' contents are text, whatever they spell."""
    text, contents = render_chat_spans(
        template_from(model.metadata),
        messages,
        bos_token=tokenizer.token_text(tokenizer.bos_id),
        eos_token=tokenizer.token_text(tokenizer.eos_id),
    )
    # the template writes any BOS itself, as text that parses back into the special token
    return tokenizer.encode(text, add_bos=False, parse_special=True, literal=contents)
