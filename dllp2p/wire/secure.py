"""A secure channel over any byte stream: a mutual pre-shared-key handshake, then sealed records. Sans I/O:
bytes in, bytes out; link.py moves them over trio streams and sockets. Built from `cryptography`'s
primitives (X25519, HKDF-SHA256, HMAC-SHA256, ChaCha20-Poly1305); nothing here is a primitive of its own.

Handshake (three messages, fixed sizes, so a reader never reads past one):

    initiator -> responder   HELLO   MAGIC(4) | e_i: X25519 public (32) | n_i: random (16)            52 bytes
    responder -> initiator   ANSWER  e_r: X25519 public (32) | n_r: random (16) | mac_r (32)           80 bytes
    initiator -> responder   FINISH  mac_i (32)                                                         32 bytes

    th     = SHA-256("dllp2p secure v1" | HELLO | e_r | n_r)           the transcript
    okm    = HKDF-SHA256(ikm = X25519(e, e'), salt = psk, info = th)   128 bytes, split into
             k_i2r | k_r2i (the two directions' AEAD keys) | m_r | m_i (the two confirmation keys)
    mac_r  = HMAC-SHA256(m_r, th | "responder"),  mac_i = HMAC-SHA256(m_i, th | "initiator")

Both ends prove they hold the psk (ClusterKey.psk): the responder with mac_r, before the initiator sends
anything else; the initiator with mac_i, before the responder reads anything else. Replay-proof: each side's
ephemeral key and nonce are fresh, so a recorded HELLO (or ANSWER, or FINISH) replayed to another
connection meets a different DH secret and transcript and its MAC fails. Forward secrecy: the ephemeral
keys are dropped after the handshake, so the psk alone does not open a recorded session.

Records after it, one or more per send (each at most MAX_RECORD bytes of plaintext):

    length (4, big-endian: ciphertext bytes, tag included) | ChaCha20-Poly1305(key of the direction,
    nonce = 4 zero bytes | counter (8, big-endian), plaintext, aad = the length bytes)

The counter starts at 0 in each direction and counts records, so a record dropped, replayed, reordered or
moved to the other direction fails to open. Overhead: 20 bytes per record (4 length + 16 tag).

Error handling: a peer without the key, a message that is not the protocol, a record that does not open:
HandshakeFailed / RecordError (both SecureError, a ProtocolError), naming what failed. The caller drops
the connection; nothing here waits, so the handshake's time limit is the caller's (link.py).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .codec import MAGIC as PLAIN_MAGIC
from .codec import ProtocolError

MAGIC = b"DLS1"  # dllp2p secure, version 1 (never a codec frame's magic, so a plain client is told apart)
NONCE = 16
PUB = 32
MAC = 32
HELLO_SIZE = len(MAGIC) + PUB + NONCE  # 52
ANSWER_SIZE = PUB + NONCE + MAC  # 80
FINISH_SIZE = MAC  # 32
LABEL = b"dllp2p secure v1"

LENGTH = struct.Struct(">I")
TAG = 16
RECORD_OVERHEAD = LENGTH.size + TAG  # 20
MAX_RECORD = 1 << 16  # plaintext bytes per record


class SecureError(ProtocolError):
    fatal = True


class HandshakeFailed(SecureError):
    """The peer did not prove it holds the cluster key (or did not speak the handshake)."""


class RecordError(SecureError):
    """A record did not open: altered, replayed, reordered, or sealed under another key."""


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _keys(psk: bytes, shared: bytes, transcript: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    okm = HKDF(hashes.SHA256(), 128, salt=psk, info=transcript).derive(shared)
    return okm[:32], okm[32:64], okm[64:96], okm[96:]


def _exchange(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:  # a low-order point: the all-zero shared secret is refused
        raise HandshakeFailed("the peer's ephemeral key is not a valid X25519 key") from None


# --- the handshake, one object per side -----------------------------------------------------------


class Initiator:
    """The dialing side: hello() -> send; answer(80 bytes) -> (FINISH to send, the Channel)."""

    def __init__(self, psk: bytes):
        self._psk = psk
        self._e = X25519PrivateKey.generate()
        self._hello = MAGIC + self._e.public_key().public_bytes_raw() + os.urandom(NONCE)

    def hello(self) -> bytes:
        return self._hello

    def answer(self, answer: bytes) -> tuple[bytes, Channel]:
        """Raises HandshakeFailed: the responder does not hold the key."""
        if len(answer) != ANSWER_SIZE:
            raise HandshakeFailed(f"handshake answer of {len(answer)} bytes, not {ANSWER_SIZE}")
        if answer.startswith(PLAIN_MAGIC):
            raise HandshakeFailed("the peer has no cluster key (it answered in plain frames; give it one: "
                                  "dllp2p key set)")
        e_r, n_r, mac_r = answer[:PUB], answer[PUB:PUB + NONCE], answer[PUB + NONCE:]
        th = hashlib.sha256(LABEL + self._hello + e_r + n_r).digest()
        k_i2r, k_r2i, m_r, m_i = _keys(self._psk, _exchange(self._e, e_r), th)
        del self._e
        if not hmac.compare_digest(mac_r, _mac(m_r, th + b"responder")):
            raise HandshakeFailed("the peer does not hold this cluster's key (its handshake proof is wrong)")
        return _mac(m_i, th + b"initiator"), Channel(k_i2r, k_r2i)


class Responder:
    """The listening side: hello(52 bytes) -> ANSWER to send; finish(32 bytes) -> the Channel."""

    def __init__(self, psk: bytes):
        self._psk = psk
        self._expect: bytes | None = None
        self._keys: tuple[bytes, bytes] | None = None

    def hello(self, hello: bytes) -> bytes:
        """Raises HandshakeFailed: not a dllp2p secure hello (a plain client, another version, garbage)."""
        if len(hello) != HELLO_SIZE or not hello.startswith(MAGIC):
            raise HandshakeFailed("the peer did not start the secure handshake (no cluster key, or another "
                                  "version of dllp2p)")
        e = X25519PrivateKey.generate()
        e_r, n_r = e.public_key().public_bytes_raw(), os.urandom(NONCE)
        th = hashlib.sha256(LABEL + hello + e_r + n_r).digest()
        k_i2r, k_r2i, m_r, m_i = _keys(self._psk, _exchange(e, hello[len(MAGIC):len(MAGIC) + PUB]), th)
        self._expect = _mac(m_i, th + b"initiator")
        self._keys = (k_r2i, k_i2r)
        return e_r + n_r + _mac(m_r, th + b"responder")

    def finish(self, finish: bytes) -> Channel:
        """Raises HandshakeFailed: the initiator does not hold the key (or replayed someone's handshake)."""
        assert self._expect is not None and self._keys is not None, "hello() first"
        if len(finish) != FINISH_SIZE or not hmac.compare_digest(finish, self._expect):
            raise HandshakeFailed("the peer does not hold this cluster's key (its handshake proof is wrong)")
        return Channel(*self._keys)


def _hkdf(ikm: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(ikm)


def mesh_keys(exporter: bytes, me: int, peer: int) -> tuple[bytes, bytes]:
    """(send key, receive key) of node `me` for the sealed activation exchange with node `peer`, from their
    mesh connection's Channel.exporter: the mirror image of what `peer` derives."""
    okm = _hkdf(exporter, b"dllp2p mesh exchange v1", 64)
    low_to_high, high_to_low = okm[:32], okm[32:]
    return (low_to_high, high_to_low) if me < peer else (high_to_low, low_to_high)


def exchange_keys(exporters: list[bytes | None], me: int) -> list[tuple[bytes, bytes] | None] | None:
    """TPNode's exchange_keys for node `me` from its mesh connections' exporters (None at `me`): None when
    the connections are plain (no cluster key), else mesh_keys per peer."""
    if all(e is None for e in exporters):
        return None
    if any((e is None) != (j == me) for j, e in enumerate(exporters)):
        raise ValueError("some mesh connections are sealed and some are not")
    return [None if e is None else mesh_keys(e, me, j) for j, e in enumerate(exporters)]


# --- records --------------------------------------------------------------------------------------


class Channel:
    """Seal what this side sends, open what it receives. Not thread-safe: one sender and one receiver at
    a time (the links serialize sends with a lock and receive in one task or thread)."""

    def __init__(self, send_key: bytes, receive_key: bytes):
        self._seal = ChaCha20Poly1305(send_key)
        self._open = ChaCha20Poly1305(receive_key)
        # the same 32 bytes at both ends (the two keys in a fixed order): keys for what else the connection
        # carries, e.g. the sealed activation exchange of a mesh socket (mesh_keys)
        self.exporter = _hkdf(min(send_key, receive_key) + max(send_key, receive_key), b"dllp2p exporter v1", 32)
        self._sent = 0
        self._received = 0
        self._buf = bytearray()  # received bytes not yet a whole record

    @staticmethod
    def _nonce(counter: int) -> bytes:
        return b"\0\0\0\0" + counter.to_bytes(8, "big")

    def seal(self, data: bytes | bytearray | memoryview) -> bytes:
        """data as one or more records (an empty send is one empty record)."""
        view = memoryview(data).cast("B")
        return b"".join(self.seal_record(view[start:start + MAX_RECORD])
                        for start in range(0, max(len(view), 1), MAX_RECORD))

    def seal_record(self, plain: bytes | memoryview) -> bytes:
        length = LENGTH.pack(len(plain) + TAG)
        sealed = self._seal.encrypt(self._nonce(self._sent), plain, length)
        self._sent += 1
        return length + sealed

    def receive(self, data: bytes | bytearray | memoryview) -> bytes:
        """Feed received bytes; -> the plaintext of every record now whole (b"" if none).
        Raises RecordError (the connection must be dropped: the stream can no longer be trusted)."""
        self._buf += data
        out = bytearray()
        at = 0  # records are opened in place and the buffer cut once: no quadratic copying
        try:
            while (n := self._record_size(at)) is not None and len(self._buf) - at >= LENGTH.size + n:
                out += self.open_record(bytes(self._buf[at:at + LENGTH.size + n]))
                at += LENGTH.size + n
        finally:
            del self._buf[:at]
        return bytes(out)

    def next_record_size(self) -> int | None:
        """The ciphertext length of the record being received, once its length bytes are in; None before."""
        return self._record_size(0)

    def _record_size(self, at: int) -> int | None:
        if len(self._buf) - at < LENGTH.size:
            return None
        (n,) = LENGTH.unpack_from(self._buf, at)
        if not TAG <= n <= MAX_RECORD + TAG:
            raise RecordError(f"a record of {n} bytes (at most {MAX_RECORD + TAG}): the stream is corrupt")
        return n

    def open_record(self, record: bytes) -> bytes:
        """One whole record (length bytes included) -> its plaintext. Raises RecordError."""
        length, sealed = record[:LENGTH.size], record[LENGTH.size:]
        try:
            plain = self._open.decrypt(self._nonce(self._received), sealed, length)
        except InvalidTag:
            raise RecordError(f"record {self._received} failed authentication (altered in flight, replayed, "
                              "or sealed under another key)") from None
        self._received += 1
        return plain

    @property
    def pending(self) -> int:
        """Bytes received and not yet opened (part of a record)."""
        return len(self._buf)
