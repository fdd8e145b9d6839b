"""The families' chat templates rendered by render_chat vs transformers' apply_chat_template rendering the
same template string (HF's jinja extensions: loop controls, strftime_now, raise_exception, its tojson,
trim_blocks / lstrip_blocks); Gemma's built-in template vs Gemma 3's own; end-of-turn tokens."""

from __future__ import annotations

import pytest

from chat_templates import GEMMA3, LLAMA32, LOOP_CONTROLS, QWEN3, QWEN25
from dllp2p.chat import GEMMA_TEMPLATE, ChatTemplateError, Message, render_chat, template_from
from dllp2p.tokenizer import BYTE_TO_CHAR, Tokenizer

SPECIALS = {
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "qwen2": {"bos_token": "", "eos_token": "<|im_end|>"},
    "qwen3": {"bos_token": "", "eos_token": "<|im_end|>"},
    "gemma3": {"bos_token": "<bos>", "eos_token": "<eos>"},
}
TEMPLATES = {"llama3": LLAMA32, "qwen2": QWEN25, "qwen3": QWEN3, "gemma3": GEMMA3}

CONVERSATIONS = {
    "user": [Message("user", "What is 2+2?")],
    "system+user": [Message("system", "You are terse."), Message("user", "What is 2+2?")],
    "multi-turn": [
        Message("system", "  Answer in French.  "),
        Message("user", "Hello!"),
        Message("assistant", " Bonjour ! \n"),
        Message("user", "Comment ça va? <b>&amp;</b> 日本 🤖"),
    ],
    "no-system multi-turn": [
        Message("user", "\n  first\n"),
        Message("assistant", "second"),
        Message("user", "third {{ not a template }} {% raw %}"),
    ],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather at a place <city> & 'country' — café",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "e.g. Zürich"}},
                "required": ["city"],
            },
        },
    }
]


@pytest.fixture(scope="module")
def hf_tok():
    """Any HF tokenizer renders a template given as chat_template=; a one-word vocabulary is enough."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as RawTokenizer, models

    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=RawTokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    )


def hf_render(hf_tok, template, messages, add_generation_prompt, **kwargs):
    conversation = [m if isinstance(m, dict) else {"role": m.role, "content": m.content} for m in messages]
    return hf_tok.apply_chat_template(
        conversation, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )


@pytest.mark.parametrize("family", TEMPLATES)
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_hf_apply_chat_template(hf_tok, family, conversation, add_generation_prompt):
    template, specials, messages = TEMPLATES[family], SPECIALS[family], CONVERSATIONS[conversation]
    ours = render_chat(template, messages, add_generation_prompt=add_generation_prompt, **specials)
    assert ours == hf_render(hf_tok, template, messages, add_generation_prompt, **specials)
    assert ours.endswith(
        {"llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n", "qwen2": "<|im_start|>assistant\n",
         "qwen3": "<|im_start|>assistant\n", "gemma3": "<start_of_turn>model\n"}[family]
    ) == add_generation_prompt


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3"])
def test_tools_render_with_hfs_tojson(hf_tok, family):
    messages = [
        Message("user", "Weather in Zürich?"),
        {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich <CH>"}}}]},
        {"role": "tool", "content": '{"temp": 21}'},
    ]
    template, specials = TEMPLATES[family], SPECIALS[family]
    ours = render_chat(template, messages, tools=TOOLS, **specials)
    assert ours == hf_render(hf_tok, template, messages, True, tools=TOOLS, **specials)
    # json.dumps as is: no HTML escapes ('\u003c', '&#39;'), non-ASCII kept
    assert "<city> & 'country' — café" in ours and "Zürich <CH>" in ours
    if family == "llama3":
        assert '{\n    "type": "function"' in ours  # tojson(indent=4)


def test_loop_controls_namespace_and_strftime_now(hf_tok):
    messages = [Message("user", "a"), Message("assistant", "b"), Message("user", "c"), Message("assistant", "d")]
    ours = render_chat(LOOP_CONTROLS, messages)
    assert ours == hf_render(hf_tok, LOOP_CONTROLS, messages, True)
    assert "<|im_start|>user\nc<|im_end|>" in ours and "\nd<|im_end|>" not in ours  # {% break %} after 'c'


def test_qwen3_thinking_blocks_and_enable_thinking(hf_tok):
    messages = [
        Message("user", "2+2?"),
        Message("assistant", "<think>\nadd them\n</think>\n\n4"),
        Message("user", "and 3+3?"),
    ]
    for enable_thinking in (True, False):
        ours = render_chat(QWEN3, messages, enable_thinking=enable_thinking)
        assert ours == hf_render(hf_tok, QWEN3, messages, True, enable_thinking=enable_thinking)
        assert "<|im_start|>assistant\n4<|im_end|>" in ours  # the earlier turn's thinking is dropped
        assert ours.endswith("<think>\n\n</think>\n\n") is (not enable_thinking)


def test_llama_date_comes_from_strftime_now_unless_given():
    import datetime

    today = datetime.datetime.now().strftime("%d %b %Y")
    assert f"Today Date: {today}\n" in render_chat(LLAMA32, [Message("user", "hi")])
    assert "Today Date: 01 Jan 2030\n" in render_chat(LLAMA32, [Message("user", "hi")], date_string="01 Jan 2030")


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_builtin_gemma_template_renders_like_gemma3s_own(hf_tok, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    ours = render_chat(GEMMA_TEMPLATE, messages, add_generation_prompt=add_generation_prompt, bos_token="<bos>")
    assert ours == hf_render(hf_tok, GEMMA3, messages, add_generation_prompt, bos_token="<bos>")


def test_builtin_gemma_template_folds_the_system_prompt():
    text = render_chat(GEMMA_TEMPLATE, [Message("system", "Be brief."), Message("user", "hi")], bos_token="<bos>")
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n<start_of_turn>model\n"


def test_template_from_falls_back_to_the_family():
    assert template_from({"general.architecture": "gemma3"}) == GEMMA_TEMPLATE
    assert template_from({"general.architecture": "gemma3", "tokenizer.chat_template": "x"}) == "x"
    assert template_from({"general.architecture": "llama"}) is None


def test_raise_exception_from_a_real_template():
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat(GEMMA3, [Message("user", "a"), Message("user", "b")])


def test_namespace_refuses_underscore_attributes():
    with pytest.raises(ChatTemplateError):
        render_chat("{% set ns = namespace(__class__=1) %}{{ ns }}", [Message("user", "hi")])
    with pytest.raises(ChatTemplateError):
        render_chat("{% set ns = namespace(a=1) %}{% set ns._x = 2 %}", [Message("user", "hi")])


# --- the end of a turn ends generation, for each family ---

TURN_ENDS = {"llama3": "<|eot_id|>", "qwen2": "<|im_end|>", "gemma3": "<end_of_turn>"}


@pytest.mark.parametrize("family", TURN_ENDS)
def test_turn_end_token_stops_generation(family):
    """eos_ids, which generate() stops on, hold the control token that the family's template closes a turn
    with: from the file's template, or (Gemma 3 270M has none) from the family's built-in one."""
    controls = ["<eos>", TURN_ENDS[family], "<|begin_of_text|>"]
    md = {
        "general.architecture": family if family != "llama3" else "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": BYTE_TO_CHAR + controls,
        "tokenizer.ggml.token_type": [1] * 256 + [3] * len(controls),
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.eos_token_id": 256,
    }
    if family != "gemma3":
        md["tokenizer.chat_template"] = TEMPLATES[family]
    tok = Tokenizer.from_metadata(md)
    assert tok.eos_ids == {256, 257}
    assert tok.token_text(257) == TURN_ENDS[family]
