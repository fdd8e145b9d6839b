"""`dllp2p chat`: turn by turn from stdin, in this process and through a daemon. Every reply must be what
a fresh engine answers to the whole conversation so far (the session reuses its KV cache between
turns; that must not change a token), /reset starts over, and a turn that does not fit the context is
refused with an error while the session goes on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT_DIR = Path(__file__).parent.parent
CLI = [sys.executable, "-m", "dllp2p.cli"]
STEPS = 12


def fresh_replies(model_path, turns: list[list[str]], ctx: int = 2048) -> list[str]:
    """For each conversation (its user lines; the replies in between are the model's own), the greedy
    reply of a new engine to all of it."""
    from dllp2p.chat import Message
    from dllp2p.formats import load_model
    from dllp2p.generate import generate
    from dllp2p.jit.engine import JITEngine
    from dllp2p.prompt import chat_tokens
    from dllp2p.sampler import Sampler, SamplerConfig
    from dllp2p.tokenizer import StreamDecoder, Tokenizer

    model = load_model(model_path)
    tok = Tokenizer.from_metadata(model.metadata)
    out = []
    for users in turns:
        messages = []
        for i, user in enumerate(users):
            messages.append(Message("user", user))
            engine = JITEngine(model, ctx, threads=1)
            try:
                dec = StreamDecoder(tok)
                ids = chat_tokens(tok, model, messages)
                text = "".join(dec.push(t) for t in generate(engine, ids, Sampler(SamplerConfig(temperature=0)),
                                                              STEPS, tok.eos_ids)) + dec.flush()
            finally:
                engine.close()
            messages.append(Message("assistant", text))
        out.append(text)
    return out


def chat(stdin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "chat", "--temperature", "0", "--steps", str(STEPS), *args], input=stdin,
                          capture_output=True, text=True, timeout=300, cwd=ROOT_DIR)


@pytest.mark.slow
def test_local_turns_are_a_fresh_engines_replies(model_path):
    a, b = "What is 2+2?", "Why is the sky blue?"
    r = chat(f"{a}\n{b}\n\n/reset\n{b}\n/exit\n{a}\n", "--local")
    assert r.returncode == 0, r.stderr
    want = fresh_replies(model_path, [[a], [a, b], [b]])
    assert r.stdout == "".join(w + "\n" for w in want)  # nothing after /exit; the blank line is skipped
    assert "a new conversation" in r.stderr


@pytest.mark.slow
def test_through_a_daemon_the_same_replies(tmp_path, model_path):
    from test_serve import KEY_FILE, Daemons

    a, b = "Name a colour.", "And another one?"
    d = Daemons(tmp_path, 1, model_path)
    try:
        address = d.start(0, "--api", "off")
        via = chat(f"{a}\n{b}\n", "--daemon", address, "--key-file", KEY_FILE)
        assert via.returncode == 0, via.stderr
        assert via.stdout == "".join(w + "\n" for w in fresh_replies(model_path, [[a], [a, b]]))
        assert any("already in its KV cache" in line for line in d.logs[0])  # turn 2 reused turn 1
    finally:
        d.stop_all()


@pytest.mark.slow
def test_a_turn_over_the_context_is_refused_and_the_session_goes_on(model_path):
    long, short = " ".join(["word"] * 300), "Hi!"
    r = chat(f"{long}\n{short}\n", "--local", "--ctx", "128")
    assert r.returncode == 0, r.stderr
    assert "dllp2p: error:" in r.stderr and "context" in r.stderr
    assert r.stdout == fresh_replies(model_path, [[short]], ctx=128)[0] + "\n"  # the long turn was taken back


def test_help_lists_the_commands(model_path):
    r = chat("/help\n/exit\n", "--local")
    assert r.returncode == 0 and r.stdout == "", r.stderr
    for command in ("/help", "/reset", "/exit", "Ctrl-C"):
        assert command in r.stderr, r.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(tmp_path, model_path):
    """In a terminal: Ctrl-C while a long reply is written stops it; the next line is answered; Up
    recalls the earlier line (readline)."""
    session = f"dllp2p-chat-{os.getpid()}"
    tmux = ["tmux", "-L", session]
    cmd = (f"cd {ROOT_DIR} && {sys.executable} -m dllp2p.cli chat --local --threads 1 --temperature 0 --steps 2000 "
           f"--model {model_path}; echo CHAT-ENDED-$?; sleep 30")
    subprocess.run([*tmux, "new-session", "-d", "-s", session, "-x", "120", "-y", "40", cmd], check=True, timeout=10)

    def screen() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-S", "-200", "-t", session], capture_output=True,
                              text=True, timeout=10).stdout

    def wait(predicate, what: str, limit: float = 120) -> str:
        deadline = time.monotonic() + limit
        while not predicate(s := screen()):
            assert time.monotonic() < deadline, f"no {what}:\n{s}"
            time.sleep(0.2)
        return s

    def keys(*k: str) -> None:
        subprocess.run([*tmux, "send-keys", "-t", session, *k], check=True, timeout=10)

    try:
        wait(lambda s: "/help lists the commands" in s and s.rstrip().endswith(">"), "prompt")
        keys("Write a long essay about the history of France.", "Enter")
        wait(lambda s: len(s.split("history of France.", 1)[-1].strip()) > 40, "reply being written")
        keys("C-c")
        wait(lambda s: "reply stopped" in s, "'reply stopped'")
        keys("Up")  # readline's history: the earlier line comes back, editable
        wait(lambda s: s.rstrip().endswith("Write a long essay about the history of France."), "recalled line")
        keys("C-u", "Say hello.", "Enter")  # the chat goes on: the next line is answered
        wait(lambda s: len(s.split("Say hello.", 1)[-1].strip()) > 2 and s.rstrip().endswith(">"), "next reply")
        keys("/exit", "Enter")
        s = wait(lambda s: "CHAT-ENDED-" in s, "end of the chat")
        assert "CHAT-ENDED-0" in s and "Traceback" not in s, s
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=10)
