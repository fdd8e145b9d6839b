"""The one client of a daemon's port: a prompt (Generate -> TokenChunk ... TokenChunk -> Done) and Status.

    GenerateCall  one Generate on one connection, its answers one by one (trio): a daemon forwarding a
                  prompt to the root relays them, `ask` prints them
    ask           the whole exchange for a person's command: first a Status, answered within seconds by
                  any dllp2p daemon (so a port held by something else fails fast and says so), then the
                  Generate; each piece of text to on_text; -> the Done. A daemon lost mid-stream is asked
                  again (RESUME_S) with the ids received so far (Generate.already): the text continues
    ask_status    one Status -> StatusReply (trio), and its round-trip

Every function takes the cluster key (`key`, None: plain frames, for a daemon without one on this
machine): the connection then starts with the secure handshake and travels sealed.

`ask_blocking` and `status_blocking` run those in a trio.run of their own, for the commands (which are
not trio programs).

Error handling: nothing listening at the address is NoDaemon; something that is not a dllp2p daemon
(another server, another protocol version) is NotADaemon; a daemon that took the prompt and then
failed, or an Error it answered, is DaemonError. All three are ConnectionErrors naming the address.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable, Sequence

import trio

from ..clusterkey import ClusterKey
from ..error_codes import ErrorCode
from .codec import ProtocolError, UnexpectedMessage
from .link import LinkClosed, LinkTimeout, TrioLink, open_link
from .messages import ChatTurn, Done, Error, Generate, Goodbye, TokenChunk
from .reports import Status, StatusReply
from .secure import HandshakeFailed


class DaemonError(ConnectionError):
    """The daemon took the prompt and then failed; the message is the daemon's (or the lost link's).
    `code`: the daemon's error_codes.ErrorCode (None: the link failed)."""

    def __init__(self, message: str, code: ErrorCode | None = None):
        super().__init__(message)
        self.code = code


class NoDaemon(DaemonError):
    """Nothing accepts connections at the address."""


class NotADaemon(DaemonError):
    """Something answers at the address, but not as a dllp2p daemon of this protocol version."""


def daemon_request(sampler, steps: int, ctx: int, *, prompt: str = "", tokens: Sequence[int] = (),  # noqa: ANN001
                   chat: bool = False, system: str | None = None, messages: Sequence[ChatTurn] = (),
                   stop: Sequence[str] = ()) -> Generate:
    """The Generate asking a daemon for a prompt (text, token ids or messages) drawn by `sampler` (a
    sampler.SamplerConfig; the root rebuilds it from these fields)."""
    s = sampler
    return Generate(prompt, tuple(tokens), chat, system, steps, ctx, float(s.temperature), s.top_k, float(s.top_p),
                    float(s.min_p), float(s.repeat_penalty), s.seed, messages=tuple(messages), stop=tuple(stop))


# --- Status ---------------------------------------------------------------------------------------


async def ask_status(address: str, timeout: float, seq: int = 0, key: ClusterKey | None = None) -> StatusReply:
    """One Status -> StatusReply exchange with the daemon at address. Raises LinkClosed, LinkTimeout,
    ProtocolError (an Error answer, or anything else, is UnexpectedMessage)."""
    return (await ask_status_timed(address, timeout, seq, key))[0]


async def ask_status_timed(address: str, timeout: float, seq: int = 0,
                           key: ClusterKey | None = None) -> tuple[StatusReply, float]:
    """ask_status, and its round-trip in seconds: Status sent -> StatusReply received (connecting not
    included). HandshakeFailed (a ProtocolError): the daemon does not hold the key."""
    link = await open_link(address, timeout, key)
    try:
        t0 = time.perf_counter()
        await link.send(Status(seq))
        reply = await link.receive(timeout)
        rtt = time.perf_counter() - t0
    finally:
        await link.aclose()
    if not isinstance(reply, StatusReply):
        detail = reply.message if isinstance(reply, Error) else type(reply).__name__
        raise UnexpectedMessage(f"{address} answered Status with {detail}")
    return reply, rtt


async def say_goodbye(address: str, bye: Goodbye, timeout: float, key: ClusterKey | None = None) -> None:
    """Best effort: bye to the daemon at address, on a connection of its own, within timeout seconds (a
    member that cannot be told learns it from its polls)."""
    with trio.move_on_after(timeout):
        try:
            link = await open_link(address, timeout, key)
            try:
                await link.send(bye)
            finally:
                await link.aclose()
        except (OSError, ProtocolError):  # LinkClosed, LinkTimeout, HandshakeFailed
            pass


def status_blocking(address: str, timeout: float, seq: int = 0,
                    key: ClusterKey | None = None) -> tuple[StatusReply, float]:
    """ask_status_timed for code outside trio. Raises LinkClosed, LinkTimeout, ProtocolError."""
    return trio.run(ask_status_timed, address, timeout, seq, key)


# --- Generate -------------------------------------------------------------------------------------


class GenerateCall:
    """One Generate on its own connection; `receive` its answers, then `aclose`."""

    def __init__(self, link: TrioLink):
        self.link = link
        self.address = link.peer

    @classmethod
    async def open(cls, address: str, g: Generate, timeout: float, key: ClusterKey | None = None) -> GenerateCall:
        """Connect and send g. Raises LinkClosed (refused, unreachable), LinkTimeout, HandshakeFailed."""
        link = await open_link(address, timeout, key)
        try:
            await link.send(g)
        except BaseException:
            await link.aclose()
            raise
        return cls(link)

    async def receive(self, timeout: float) -> TokenChunk | Done | Error:
        """The next answer. Raises LinkClosed, LinkTimeout, ProtocolError (any other message:
        UnexpectedMessage)."""
        msg = await self.link.receive(timeout)
        if not isinstance(msg, (TokenChunk, Done, Error)):
            raise UnexpectedMessage(f"{self.address} answered a Generate with {type(msg).__name__}")
        return msg

    async def aclose(self) -> None:
        await self.link.aclose()


async def probe(address: str, connect_timeout: float, answer_timeout: float, key: ClusterKey | None = None) -> None:
    """Is a dllp2p daemon of this version (and of this cluster key) at address? Raises NoDaemon, NotADaemon;
    returns within about connect_timeout + answer_timeout seconds."""
    try:
        link = await open_link(address, connect_timeout, key)
    except HandshakeFailed as e:
        raise NotADaemon(f"{address} is not a daemon of this cluster ({e}); "
                         "`dllp2p key show` there and `dllp2p key set` here") from None
    except (LinkClosed, LinkTimeout) as e:
        if key is not None and isinstance(e, LinkClosed) and "cannot connect" not in str(e):
            raise NotADaemon(f"{address} closed the connection during the handshake: it is not a dllp2p "
                             "daemon with this cluster key") from None
        raise NoDaemon(f"no dllp2p daemon answers at {address} ({e})") from None
    try:
        await link.send(Status(0))
        reply = await link.receive(answer_timeout)
    except LinkTimeout:
        raise NotADaemon(f"{address} is not a dllp2p daemon: it accepted a connection but did not answer "
                         f"within {answer_timeout:g} s") from None
    except (LinkClosed, ProtocolError) as e:
        hint = "" if key is not None else "; if it has a cluster key, give it: --key-file PATH"
        raise NotADaemon(f"{address} is not a dllp2p daemon of this version ({e}){hint}") from None
    finally:
        await link.aclose()
    if not isinstance(reply, StatusReply):
        detail = reply.message if isinstance(reply, Error) else type(reply).__name__
        raise NotADaemon(f"{address} is not a dllp2p daemon of this version (it answered {detail})")


RESUME_S = 30.0  # how long `ask` keeps resuming a stream whose daemon went away (a restart takes seconds)


async def ask(address: str, g: Generate, on_text: Callable[[str], None], *, connect_timeout: float = 1.0,
              probe_timeout: float = 5.0, answer_timeout: float = 900.0, key: ClusterKey | None = None,
              resume_s: float = RESUME_S) -> Done:
    """Send g to the daemon at address, handing each piece of text to on_text. -> its Done.

    A daemon lost mid-stream (the root this client talks to directly: killed, or stopping and answering
    draining) is asked again for up to resume_s seconds (a restart, `systemctl restart`), with the ids
    of the text received so far as Generate.already: the text goes on where it stopped, without any of
    it generated twice (the prefix is prefilled in one batch).

    Raises NoDaemon, NotADaemon (before the prompt is sent), DaemonError (once the daemon has it)."""
    await probe(address, connect_timeout, probe_timeout, key)
    already: list[int] = list(g.already)
    deadline = None
    while True:
        try:
            return await _ask_once(address, g, on_text, already, connect_timeout, answer_timeout, key,
                                   retrying=deadline is not None)
        except _Lost as e:
            deadline = deadline if deadline is not None else trio.current_time() + resume_s
            if e.ids_missing or trio.current_time() >= deadline:
                raise DaemonError(str(e), e.code) from None
            g = replace(g, already=tuple(already))
            await trio.sleep(min(0.5, max(0.0, deadline - trio.current_time())))


class _Lost(DaemonError):
    """The daemon went away (or is stopping) in the middle of the answer: it can be asked again."""

    def __init__(self, message: str, code: ErrorCode | None = None, ids_missing: bool = False):
        super().__init__(message, code)
        self.ids_missing = ids_missing  # a daemon that sent text without ids: the stream cannot be resumed


async def _ask_once(address: str, g: Generate, on_text: Callable[[str], None], already: list[int],
                    connect_timeout: float, answer_timeout: float, key: ClusterKey | None, retrying: bool) -> Done:
    """One Generate; each chunk's ids appended to `already`. Raises _Lost, NoDaemon, DaemonError."""
    try:
        call = await GenerateCall.open(address, g, connect_timeout, key)
    except (LinkClosed, LinkTimeout, HandshakeFailed) as e:
        if retrying:  # the daemon may be restarting
            raise _Lost(f"no dllp2p daemon answers at {address} ({e})", ErrorCode.UNREACHABLE) from None
        raise NoDaemon(f"no dllp2p daemon answers at {address} ({e})") from None
    resumable = True
    try:
        while True:
            msg = await call.receive(answer_timeout)
            if isinstance(msg, TokenChunk):
                on_text(msg.text)
                already.extend(msg.ids)
                resumable = resumable and (bool(msg.ids) or not msg.text)
            elif isinstance(msg, Done):
                return msg
            else:
                hint = msg.kind.hint  # ErrorCode: what the person can do about it
                text = f"daemon {address}: {msg.message}" + (f" ({hint})" if hint else "")
                if msg.kind is ErrorCode.DRAINING:
                    raise _Lost(text, msg.kind, not resumable)
                raise DaemonError(text, msg.kind)
    except (LinkClosed, LinkTimeout) as e:
        raise _Lost(f"daemon {address}: {e}", None, not resumable) from None
    except ProtocolError as e:
        raise DaemonError(f"daemon {address}: {e}") from None
    finally:
        with trio.CancelScope(shield=True):
            await call.aclose()


def ask_blocking(address: str, g: Generate, on_text: Callable[[str], None], key: ClusterKey | None = None,
                 **timeouts: float) -> Done:
    """ask, for code outside trio (the commands)."""
    return trio.run(lambda: ask(address, g, on_text, key=key, **timeouts))
