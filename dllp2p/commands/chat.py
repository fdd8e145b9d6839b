"""`dllp2p chat`: a conversation, one line per turn from stdin, each reply streamed to stdout.

    you (stdin)  -> the conversation (messages) -> the model's chat template -> tokens -> a reply
    /reset       starts a new conversation (the system prompt stays); /exit, /quit or end of input ends

Every turn sends the whole conversation: to the local daemon as a Generate with its messages (the
root's kept session already holds the earlier turns in its KV cache, so only the new message is
computed), or, with no daemon, to one engine kept in this process for the session (generate's
`cached`: the same reuse). Replies are those a fresh engine would give the same conversation.

A turn that fails (the conversation no longer fits --ctx, the daemon busy or a worker lost) prints
one `dllp2p: error: ...` line and is taken back; the session goes on.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, TextIO

import trio

from ..chat import Message
from ..config import ClientTimeouts
from ..errors import user_facing_errors
from ..formats import load_model
from ..generate import GenerationStats, generate
from ..models import resolve_model
from ..prompt import chat_tokens
from ..sampler import Sampler
from ..tokenizer import StreamDecoder, Tokenizer
from ..wire.client import DaemonError, NoDaemon, ask_blocking, daemon_request, probe
from ..wire.messages import ChatTurn

COMMANDS = {"/exit": "exit", "/quit": "exit", "/reset": "reset"}


class Local:
    """The model in this process: one engine for the whole session, its KV cache reused turn to turn."""

    def __init__(self, cfg: Any):
        from ..jit.engine import JITEngine  # llvmlite: loaded when the model runs here

        self.cfg = cfg
        self.model = load_model(resolve_model(cfg.model))
        self.tokenizer = Tokenizer.from_metadata(self.model.metadata)
        extra = {} if getattr(cfg, "cache_dir", None) is None else {"cache_dir": cfg.cache_dir}
        self.engine = JITEngine(self.model, cfg.ctx, cfg.threads, **extra)
        self.sampler = Sampler(cfg.sampler)  # one random stream for the session
        self.kv: tuple[int, ...] = ()

    def reply(self, messages: list[Message], show: Callable[[str], None]) -> str:
        ids = chat_tokens(self.tokenizer, self.model, messages)
        stats, decoder, text = GenerationStats(), StreamDecoder(self.tokenizer), []
        for token in generate(self.engine, ids, self.sampler, self.cfg.steps, self.tokenizer.eos_ids, stats,
                              cached=self.kv):
            if piece := decoder.push(token):
                text.append(piece)
                show(piece)
        if tail := decoder.flush():
            text.append(tail)
            show(tail)
        self.kv = stats.kv_tokens
        return "".join(text)

    def close(self) -> None:
        self.engine.close()


class ViaDaemon:
    """Each turn to the daemon at `address` (which serves it as root or forwards it to the root)."""

    def __init__(self, cfg: Any, address: str, timeouts: ClientTimeouts = ClientTimeouts()):
        self.cfg, self.address, self.t = cfg, address, timeouts

    def reply(self, messages: list[Message], show: Callable[[str], None]) -> str:
        text: list[str] = []

        def keep(piece: str) -> None:
            text.append(piece)
            show(piece)

        g = daemon_request(self.cfg.sampler, self.cfg.steps, self.cfg.ctx, chat=True,
                           messages=[ChatTurn(m.role, m.content) for m in messages])
        try:
            ask_blocking(self.address, g, keep, getattr(self.cfg, "key", None), connect_timeout=self.t.connect, probe_timeout=self.t.probe,
                         answer_timeout=self.t.answer)
        except NoDaemon as e:
            raise DaemonError(f"daemon {self.address} no longer answers ({e})") from None
        return "".join(text)

    def close(self) -> None:
        pass


def backend(cfg: Any, timeouts: ClientTimeouts = ClientTimeouts()):  # -> Local | ViaDaemon
    """Through cfg.daemon if one answers there, else (cfg.fallback: the default daemon's address, not one
    named) in this process. Raises NoDaemon (a named daemon), NotADaemon."""
    if cfg.daemon is not None:
        try:
            trio.run(probe, cfg.daemon, timeouts.connect, timeouts.probe, getattr(cfg, "key", None))
            return ViaDaemon(cfg, cfg.daemon, timeouts)
        except NoDaemon:
            if not cfg.fallback:
                raise
    return Local(cfg)


def chat(cfg: Any, inp: TextIO = sys.stdin, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    model = backend(cfg)
    start = [Message("system", cfg.system)] if cfg.system else []
    messages = list(start)
    prompt = inp.isatty()

    def show(piece: str) -> None:
        out.write(piece)
        out.flush()

    try:
        while True:
            if prompt:
                err.write("> ")
                err.flush()
            line = inp.readline()
            if not line:
                break
            text = line.rstrip("\r\n")
            command = COMMANDS.get(text.strip())
            if command == "exit":
                break
            if command == "reset":
                messages = list(start)
                print("dllp2p: a new conversation", file=err)
                continue
            if not text.strip():
                continue
            messages.append(Message("user", text))
            try:
                answer = model.reply(messages, show)
            except user_facing_errors() as e:
                messages.pop()
                print(f"\ndllp2p: error: {e}", file=err)
                continue
            out.write("\n")
            out.flush()
            messages.append(Message("assistant", answer))
    finally:
        model.close()
    return 0
