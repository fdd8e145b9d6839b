"""Chat templates render like HF's apply_chat_template, in a sandbox."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dllp2p.chat import ChatTemplateError, Message, chat_messages, render_chat, template_from


def test_matches_hf_apply_chat_template(real_model, hf_tokenizer):
    template = template_from(real_model.metadata)
    for system in (None, "You are terse."):
        msgs = chat_messages("What is 2+2?", system)
        ours = render_chat(template, msgs)
        theirs = hf_tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in msgs], tokenize=False, add_generation_prompt=True
        )
        assert ours == theirs
    assert "You are terse." in render_chat(template, chat_messages("hi", "You are terse."))


def test_default_system_prompt_comes_from_the_template(real_model):
    text = render_chat(template_from(real_model.metadata), chat_messages("hi"))
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


def test_no_template_is_a_clear_error():
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_chat(None, [Message("user", "hi")])


def test_raise_exception_and_syntax_errors_are_chat_errors():
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat("{{ raise_exception('roles must alternate') }}", [Message("user", "hi")])
    with pytest.raises(ChatTemplateError, match="failed to render"):
        render_chat("{% for %}", [Message("user", "hi")])


def test_sandbox_blocks_attribute_escapes():
    with pytest.raises(ChatTemplateError):
        render_chat("{{ messages.__class__.__mro__[1].__subclasses__() }}", [Message("user", "hi")])


def test_jinja2_is_imported_only_to_render():
    """A run without --chat must not pay for importing jinja2."""
    code = "import sys, dllp2p.cli, dllp2p.commands.run, dllp2p.errors; assert 'jinja2' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
