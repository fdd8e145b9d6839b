"""`dllp2p run`: through the local daemon if one answers (it hands the prompt to the cluster's root and
streams the text back), else on this machine: model -> tokens -> engine -> streamed text on stdout,
stats on stderr."""

from __future__ import annotations

import sys
from typing import Sequence, TextIO

from .chat import Message, chat_messages, render_chat, template_from
from .engine import Engine
from .formats import GGUFModel, load_model
from .generate import GenerationStats, generate
from .models import resolve_model
from .sampler import Sampler
from .tokenizer import StreamDecoder, Tokenizer


def prompt_tokens(tokenizer: Tokenizer, model: GGUFModel, prompt: str, chat: bool, system: str | None) -> list[int]:
    if not chat:
        return tokenizer.encode(prompt)
    return chat_tokens(tokenizer, model, chat_messages(prompt, system))


def chat_tokens(tokenizer: Tokenizer, model: GGUFModel, messages: Sequence[Message]) -> list[int]:
    """A conversation in the model's chat template, ending where the assistant's next reply begins."""
    text = render_chat(
        template_from(model.metadata),
        messages,
        bos_token=tokenizer.token_text(tokenizer.bos_id),
        eos_token=tokenizer.token_text(tokenizer.eos_id),
    )
    # the template writes any BOS itself, as text that parses back into the special token
    return tokenizer.encode(text, add_bos=False, parse_special=True)


def make_engine(kind: str, model: GGUFModel, ctx: int, threads: int | None = None, cluster=None) -> Engine:
    if kind == "reference":
        from .reference import ReferenceEngine

        return ReferenceEngine(model, ctx, keep_weights=True)
    if kind == "jit":
        from .jit.engine import JITEngine

        return JITEngine(model, ctx, threads)
    if kind == "cluster":  # cluster: a cluster.ClusterOptions
        from .cluster import ClusterEngine

        return ClusterEngine.connect(model, cluster, ctx, threads)
    raise ValueError(f"unknown engine {kind!r}")


class DaemonError(ConnectionError):
    """The daemon took the prompt and then failed; the message is the daemon's (or the lost link's).
    `code`: the daemon's error_codes.ErrorCode (None: the link failed)."""

    def __init__(self, message: str, code=None):
        super().__init__(message)
        self.code = code


CONNECT_TIMEOUT = 1.0  # seconds to find out whether a daemon listens
ANSWER_TIMEOUT = 900.0  # seconds of silence from a daemon that took the prompt (set-up, weight push)


def run(cfg, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Through cfg.daemon if it is set and answers, else in this process."""
    if cfg.daemon is not None:
        status = run_via_daemon(cfg, cfg.daemon, out, err)
        if status is not None:
            return status
    return run_local(cfg, out, err)


def run_via_daemon(cfg, address: str, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int | None:
    """Send the prompt to the daemon at address and print what comes back. -> None if nothing listens
    there (the caller runs the prompt itself). Raises DaemonError once the daemon has the prompt."""
    g = daemon_request(cfg.sampler, cfg.steps, cfg.ctx, prompt=cfg.prompt, chat=cfg.chat, system=cfg.system)

    def show(text: str) -> None:
        out.write(text)
        out.flush()

    msg = ask_daemon(address, g, show)
    if msg is None:
        return None
    out.write("\n")
    out.flush()
    tok_s = f"prefill {msg.prefill_tok_s:.1f} tok/s, decode {msg.decode_tok_s:.1f} tok/s"
    print(f"dllp2p: prompt {msg.prompt_tokens} tokens, generated {msg.generated_tokens} tokens; {tok_s} "
          f"(root {msg.root}, {msg.nodes} node{'s' if msg.nodes != 1 else ''})", file=err)
    if cfg.stats:
        for line in msg.stats:
            print(f"dllp2p: {line}", file=err)
    return 0


def daemon_request(sampler, steps: int, ctx: int, *, prompt: str = "", tokens: Sequence[int] = (), chat: bool = False,
                   system: str | None = None, messages: Sequence = (), stop: Sequence[str] = ()):
    """The protocol.Generate asking a daemon for a prompt (text, token ids or messages) drawn by `sampler`
    (a SamplerConfig; the root rebuilds it from these fields)."""
    from .protocol import Generate

    s = sampler
    return Generate(prompt, tuple(tokens), chat, system, steps, ctx, float(s.temperature), s.top_k, float(s.top_p),
                    float(s.min_p), float(s.repeat_penalty), s.seed, messages=tuple(messages), stop=tuple(stop))


def ask_daemon(address: str, g, on_text):  # (str, protocol.Generate, (str) -> None) -> protocol.Done | None
    """Send g to the daemon at address, handing each piece of text to on_text. -> its Done, or None if
    nothing listens there. Raises DaemonError once the daemon has the prompt."""
    import socket

    from .link import BlockingLink, LinkClosed, LinkTimeout, parse_address
    from .protocol import Done, Error, ProtocolError, TokenChunk

    host, port = parse_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except OSError:
        return None
    link = BlockingLink(sock, address)
    try:
        sock.settimeout(ANSWER_TIMEOUT)
        link.send(g)
        while True:
            msg = link.receive(ANSWER_TIMEOUT)
            if isinstance(msg, TokenChunk):
                on_text(msg.text)
            elif isinstance(msg, Done):
                return msg
            elif isinstance(msg, Error):
                hint = msg.kind.hint  # ErrorCode: what the person can do about it
                raise DaemonError(f"daemon {address}: {msg.message}" + (f" ({hint})" if hint else ""), msg.kind)
            else:
                raise DaemonError(f"daemon {address} answered the prompt with {type(msg).__name__}")
    except (LinkClosed, LinkTimeout, ProtocolError) as e:
        raise DaemonError(f"daemon {address}: {e}") from None
    finally:
        link.close()


def run_local(cfg, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    model = load_model(resolve_model(cfg.model))
    tokenizer = Tokenizer.from_metadata(model.metadata)
    ids = prompt_tokens(tokenizer, model, cfg.prompt, cfg.chat, cfg.system)
    cluster = None
    if cfg.workers:
        from .cluster import ClusterOptions

        cluster = ClusterOptions(cfg.workers, cfg.plan, exchange=cfg.exchange)
    engine = make_engine("cluster" if cluster else cfg.engine, model, cfg.ctx, cfg.threads, cluster)
    stats = GenerationStats()
    decoder = StreamDecoder(tokenizer)
    try:
        for token in generate(engine, ids, Sampler(cfg.sampler), cfg.steps, tokenizer.eos_ids, stats):
            out.write(decoder.push(token))
            out.flush()
        out.write(decoder.flush() + "\n")
        out.flush()
    finally:
        engine.close()
    print(f"dllp2p: {stats.summary()}", file=err)
    if cfg.stats and hasattr(engine, "stats_summary"):
        for line in engine.stats_summary():
            print(f"dllp2p: {line}", file=err)
    return 0
