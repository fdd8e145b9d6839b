"""`dllp2p chat`: a conversation, one line per turn from stdin, each reply streamed to stdout.

    you (stdin)  -> the conversation (messages) -> the model's chat template -> tokens -> a reply
    /reset       starts a new conversation (the system prompt stays); /exit, /quit or end of input ends
    /help        lists the commands; Ctrl-C stops the reply being written, and the chat goes on

On a terminal, lines are read with the stdlib's readline: editing, and the session's earlier lines
with Up and Down.

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
from ..textsafe import printable
from ..tokenizer import StreamDecoder, Tokenizer
from ..wire.client import DaemonError, NoDaemon, ask_blocking, daemon_request, probe
from ..wire.messages import ChatTurn
from .run import chosen_threads

COMMANDS = {"/exit": "exit", "/quit": "exit", "/reset": "reset", "/help": "help"}


class Local:
    """The model in this process: one engine for the whole session, its KV cache reused turn to turn."""

    def __init__(self, cfg: Any):
        from ..jit.engine import JITEngine  # llvmlite: loaded when the model runs here

        self.cfg = cfg
        self.model = load_model(resolve_model(cfg.model))
        self.tokenizer = Tokenizer.from_metadata(self.model.metadata)
        extra = {} if getattr(cfg, "cache_dir", None) is None else {"cache_dir": cfg.cache_dir}
        threads = cfg.threads or chosen_threads(sys.stderr)
        self.engine = JITEngine(self.model, cfg.ctx, threads, **extra)
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


HELP = """\
/help          this list
/reset         a new conversation (the system prompt stays)
/exit, /quit   leave (so do Ctrl-D and the end of input)
Ctrl-C         stops the reply being written (what was written stays in the conversation)
Up, Down       earlier lines (on a terminal: the line can be edited too)"""


def _reader(inp: TextIO) -> Callable[[], str | None]:
    """-> a function returning the next line without its newline, None at the end of input. On a
    terminal, with line editing and history (stdlib readline, where the platform has it)."""
    if inp is sys.stdin and inp.isatty():
        try:
            import readline  # noqa: F401 - loading it gives input() line editing and history
        except ImportError:
            pass

        def read_tty() -> str | None:
            try:
                return input("> ")
            except EOFError:
                return None

        return read_tty

    def read() -> str | None:
        line = inp.readline()
        return line.rstrip("\r\n") if line else None

    return read


def chat(cfg: Any, inp: TextIO = sys.stdin, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    model = backend(cfg)
    start = [Message("system", cfg.system)] if cfg.system else []
    messages = list(start)
    read = _reader(inp)
    shown: list[str] = []  # of the reply being written

    def show(piece: str) -> None:
        shown.append(piece)
        out.write(piece)
        out.flush()

    if inp.isatty():
        print("dllp2p: type a message and Enter; /help lists the commands", file=err)
    try:
        while True:
            try:
                text = read()
            except KeyboardInterrupt:  # at the prompt: a fresh line, the chat goes on
                print("\ndllp2p: (/exit or Ctrl-D to leave)", file=err)
                continue
            if text is None:
                break
            command = COMMANDS.get(text.strip())
            if command == "exit":
                break
            if command == "help":
                print(HELP, file=err)
                continue
            if command == "reset":
                messages = list(start)
                print("dllp2p: a new conversation", file=err)
                continue
            if not text.strip():
                continue
            messages.append(Message("user", text))
            shown.clear()
            try:
                answer = model.reply(messages, show)
            except KeyboardInterrupt:
                answer = "".join(shown)
                print("\ndllp2p: reply stopped", file=err)
            except user_facing_errors() as e:
                messages.pop()
                print(f"\ndllp2p: error: {printable(str(e))}", file=err)  # may quote a peer
                continue
            else:
                out.write("\n")
                out.flush()
            messages.append(Message("assistant", answer))
    finally:
        model.close()
    return 0
