"""The sealed activation exchange: tp_program's messages under ChaCha20-Poly1305, when the cluster has a key.

build_tp_program(..., sealed=True) sends and receives every exchange message through sealed_transfer (in
place of _TPForward.transfer, which it calls to move the sealed bytes). The
AEAD is libsodium's (crypto_aead_chacha20poly1305_ietf_encrypt / _decrypt, IETF: 96-bit nonce), called
through the table scalars `seal_fn` and `open_fn`: addresses of PyNaCl's bundled libsodium (tp.sodium_aead);
no cryptography of our own. Buffers (the node's, tp.TPNode._extra_buffers):

    xkeys    u8[n_nodes, 2, 32]   peer j: the key this node seals with, then the one it opens with
    xcount   i64[n_nodes, 2]      peer j: messages sealed to it, messages opened from it
    xnonce   u8[16]               the nonce being used: counter (8 bytes, little-endian) | 4 zero bytes
    sealed   u8[largest message + TAG]   the sealed message being sent or received

Both ends advance each direction's counter identically (the exchange is deterministic), so no nonce
travels and a message dropped, replayed, reordered or moved to another link fails to open. The sender seals
buf into `sealed` and sends nbytes + TAG; the receiver receives nbytes + TAG into `sealed` and opens it into
buf (libsodium checks the tag before writing anything but zeros). A message that fails to open sets the
table's error = AUTH_FAILED + peer + 1: later exchanges are skipped, the step ends, and Python raises
tp.ExchangeAuthFailed. Only thread 0 exchanges, so one `xnonce` and one `sealed` suffice.
"""

from __future__ import annotations

import llvmlite.ir as ir

from .irutil import I32, I64, PTR, gep, i64

TAG = 16  # ChaCha20-Poly1305's tag: a sealed message is its payload + TAG bytes
AUTH_FAILED = 1 << 32  # added to error's peer + 1 when a sealed message fails to open
KEY_BYTES = 32


def foreign(fwd, slot: str, ret: ir.Type, args: list[ir.Type]) -> ir.Value:
    """A C function whose address is the table scalar `slot`, callable with b.call (an indirect call:
    llvmlite reads the callee's signature from the pointer's pointee type; it prints as `ptr`)."""
    return fwd.b.inttoptr(fwd.scalar(slot), ir.PointerType(ir.FunctionType(ret, args)))


def sealed_transfer(fwd, raw, fn: ir.Function, peer: int, buf: ir.Value, nbytes: ir.Value, flags: int) -> None:
    """Emit, in fwd (tp_program._TPForward) on thread 0: send buf's nbytes to peer sealed (fn: fwd.send),
    or receive and open nbytes from peer into buf (fn: fwd.recv); raw(fn, peer, buf, nbytes, flags) moves
    the sealed bytes (the unsealed transfer). See the module docstring."""
    b, sending = fwd.b, fn is fwd.send
    scratch, null = fwd.ptr("sealed"), ir.Constant(PTR, None)
    key = gep(b, fwd.ptr("xkeys"), i64(peer * 2 * KEY_BYTES + (0 if sending else KEY_BYTES)))
    counter = gep(b, fwd.ptr("xcount"), i64(2 * peer + (0 if sending else 1)), I64)
    nonce = fwd.ptr("xnonce")
    count = b.load(counter, typ=I64)
    b.store(count, nonce)
    b.store(ir.Constant(I32, 0), gep(b, nonce, i64(8)))
    b.store(b.add(count, i64(1)), counter)
    sealed_bytes = b.add(nbytes, i64(TAG))
    if sending:  # int encrypt(c, clen_p, m, mlen, ad, adlen, nsec, npub, k)
        seal = foreign(fwd, "seal_fn", I32, [PTR, PTR, PTR, I64, PTR, I64, PTR, PTR, PTR])
        b.call(seal, [scratch, null, buf, nbytes, null, i64(0), null, nonce, key])
        raw(fn, peer, scratch, sealed_bytes, flags)
        return
    raw(fn, peer, scratch, sealed_bytes, flags)
    err_slot = gep(b, fwd.table, i64(fwd.slots["error"]), I64)
    with b.if_then(b.icmp_signed("==", b.load(err_slot, typ=I64), i64(0))):
        # int decrypt(m, mlen_p, nsec, c, clen, ad, adlen, npub, k): 0, or -1 if it does not open
        open_ = foreign(fwd, "open_fn", I32, [PTR, PTR, PTR, PTR, I64, PTR, I64, PTR, PTR])
        rc = b.call(open_, [buf, null, null, scratch, sealed_bytes, null, i64(0), nonce, key])
        with b.if_then(b.icmp_signed("!=", rc, ir.Constant(I32, 0))):
            b.store(i64(AUTH_FAILED + peer + 1), err_slot)
