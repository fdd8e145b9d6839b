"""The int8 kernels against their numpy twins, for one target: run by tests/test_aarch64.py under
qemu-aarch64 (`python tests/aarch64_kernels.py`, target from DLLP2P_TARGET_CPU, e.g. cortex-a72 for the
plain NEON path, cortex-a76 for sdot). Not collected by pytest itself (no test_ prefix).

A focused subset of test_jit_kernels.py, chosen to stay within CI time under emulation (compiling is
the cost: one small module): activation quantization bit-exact; the matvec of SmolLM2's types (Q4_0,
Q4_1, Q8_0), a 5-bit, two K-quant and the two IQ4 types (each dot path: 4-bit values, Q8_0's flipped
bytes, the pair sums of 5/6-bit values, the IQ4 table lookup with `tbl`), at a single-group and a
multi-group shape with a row range, with the largest products in the last block; and the tile-2 matmul
of Q4_0, Q8_0, Q6_K and IQ4_XS (2 + 2 + 1 activation rows: the tile twice and the one-row tail; a tile of 3
compiled a third tile function for no path the engine takes); the barrier
(3 threads, spinning and sleeping on the futex: aarch64's system call number).
Same tolerances as test_jit_kernels.py. Prints one line per check and 'ok N' at the end; any failure
raises (non-zero exit).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402

from dllp2p.formats.quant import QK, QType  # noqa: E402
from dllp2p.jit import reference as ref  # noqa: E402
from dllp2p.jit.bench_barrier import run_demo, sleeps  # noqa: E402
from dllp2p.jit.compiler import default_target  # noqa: E402
from dllp2p.jit.layout import EXTRA_TYPES, act_bytes, pack_weights  # noqa: E402
from dllp2p.jit.library import compile_kernels  # noqa: E402
from dllp2p.jit.specs import KernelSpec, Op  # noqa: E402
from test_jit_kernels import (  # noqa: E402
    P, SENTINEL, assert_within, extreme_values, kk, q8s, q_tol, random_acts, random_raw, run_matvec_q,
)

MATVEC_TYPES = (QType.Q4_0, QType.Q4_1, QType.Q8_0, QType.Q5_0, QType.Q4_K, QType.Q6_K, QType.IQ4_NL, QType.IQ4_XS)
MATMUL_TYPES = (QType.Q4_0, QType.Q8_0, QType.Q6_K, QType.IQ4_XS)
SHAPES = ((13, 256, 0, 13), (40, 512, 16, 40))  # rows, k, r0, r1


def with_extremes(raw: np.ndarray, qtype: QType) -> np.ndarray:
    """raw with the last block of every row at its largest magnitudes (as test_fallback_dot_paths)."""
    if qtype in EXTRA_TYPES:
        return extreme_values(raw, qtype)
    raw = raw.copy()
    raw[:, -QK // 2 * (2 if qtype == QType.Q8_0 else 1):] = 0xFF if qtype != QType.Q8_0 else 0x80
    return raw


def main() -> int:
    target = default_target()
    print(f"target {target.triple} {target.cpu} {target.features} dot_isa={target.dot_isa}", flush=True)
    t0 = time.perf_counter()
    specs = ([KernelSpec(Op.QUANTIZE)] + [KernelSpec(Op.MATVEC, q) for q in MATVEC_TYPES]
             + [KernelSpec(Op.MATMUL, q, 2) for q in MATMUL_TYPES] + [KernelSpec(Op.BARRIER_DEMO)])
    lib = compile_kernels(specs, cache_dir=None, target=target)
    print(f"compiled {len(specs)} kernels in {time.perf_counter() - t0:.1f} s", flush=True)
    rng = np.random.default_rng(21)
    checks = 0

    x = random_acts(rng, 4, 512)
    x[:, -QK:] = 127.0 * np.sign(rng.standard_normal(QK))
    got = q8s(lib, x)
    np.testing.assert_array_equal(got, ref.quantize_f32_q8s(x))
    checks += 1
    print("quantize_f32_q8s bit-exact", flush=True)

    for qtype in MATVEC_TYPES:
        for rows, k, r0, r1 in SHAPES:
            k = kk(qtype, k)
            raw = with_extremes(random_raw(rng, qtype, rows, k), qtype)
            xv = random_acts(rng, 1, k)[0]
            xv[-QK:] = 127.0 * np.sign(rng.standard_normal(QK))  # |q| = 127: the largest products
            run_matvec_q(lib, qtype, raw, rows, k, xv, r0, r1)
            checks += 1
            print(f"matvec {qtype.name} rows={rows} k={k} [{r0},{r1}) within the bound", flush=True)

    for qtype in MATMUL_TYPES:
        rows, k, n = 21, kk(qtype, 256), 5
        raw = with_extremes(random_raw(rng, qtype, rows, k), qtype)
        m = pack_weights(raw, qtype, (rows, k))
        acts = q8s(lib, random_acts(rng, n, k))
        assert acts.shape == (n, act_bytes(k))
        y = np.full((n + 1, rows), SENTINEL, np.float32)
        lib[KernelSpec(Op.MATMUL, qtype, 2).name](P(m.data), P(acts), P(y), k, 0, rows, n, rows)
        exact = ref.matmul_q_q8s(raw, qtype, acts, k)
        for c in range(n):
            bound = ref.matvec_q_q8s_bound(raw, qtype, acts[c], k)
            assert_within(y[c], exact[c], q_tol(qtype, k, bound), f"matmul {qtype.name} row {c}")
        assert (y[n] == SENTINEL).all()
        checks += 1
        print(f"matmul x2 {qtype.name} rows={rows} k={k} n={n} within the bound", flush=True)
    for spins in (0, 1):  # the default spin limit, then every wait on the futex
        buf, state, _ = run_demo(lib, 3, 100, spins, timeout=120)
        np.testing.assert_array_equal(buf, ref.barrier_demo(3, 100))
        assert spins == 0 or sleeps(state) > 0, "no waiter slept with a spin limit of 1"
    checks += 1
    print("barrier_demo 3 threads, spinning and on the futex, bit-exact", flush=True)
    print(f"ok {checks} checks in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
