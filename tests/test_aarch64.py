"""AArch64 (Raspberry Pi 4: Cortex-A72; Pi 5: Cortex-A76): the target override, the kernels' assembly
for each Pi, and, under qemu-aarch64 with the Debian arm64 sysroot that .ci/aarch64-sysroot.sh builds,
SmolLM2's logits equal to this machine's (bit for bit) and a cluster of an x86 process and an aarch64
daemon giving the single-node text (the kernels against their numpy twins under qemu:
test_aarch64_kernels.py).

The qemu tests skip, saying why, when the sysroot or qemu-aarch64-static is missing; .ci/run builds both.
QEMU_CPU=max emulates a CPU with every feature qemu knows (dot product included), so both the sdot
(cortex-a76) and the plain NEON (cortex-a72) code run; the target is chosen with DLLP2P_TARGET_CPU.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ports import free_port
from dllp2p.jit.compiler import (
    AARCH64_TRIPLE, TARGET_ENV, Target, TargetError, emit_assembly, host_target, parse_target, target_from_env,
)
from dllp2p.jit.library import build_module
from dllp2p.jit.specs import QUANT_WEIGHTS, KernelSpec, Op
from dllp2p.formats.quant import QType

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
AARCH64_DIR = Path(os.environ.get("DLLP2P_AARCH64_DIR") or Path.home() / ".cache" / "dllp2p-aarch64")
QEMU = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
PROMPT = ["--prompt", "The capital of France is", "--temperature", "0", "--steps", "8", "--threads", "1"]


# --- the target override (no qemu needed) -----------------------------------------------------------

def test_parse_target_names_and_features():
    a76, a72 = parse_target("cortex-a76"), parse_target("cortex-a72")
    assert a76.triple == a72.triple == AARCH64_TRIPLE
    assert (a76.dot_isa, a72.dot_isa) == ("dotprod", "neon")
    assert parse_target("cortex-a76,-dotprod").dot_isa == "neon"  # a feature switched off
    assert parse_target("cortex-a72,+dotprod").dot_isa == "dotprod"
    assert parse_target("icelake-server").dot_isa == "avx512vnni"
    assert parse_target("alderlake").dot_isa == "avxvnni"
    assert parse_target("haswell").dot_isa == "avx2"
    assert parse_target("x86-64").dot_isa == "generic"
    t = parse_target(f"{AARCH64_TRIPLE}:cortex-x1,+neon,+dotprod")
    assert t == Target(AARCH64_TRIPLE, "cortex-x1", "+neon,+dotprod")
    with pytest.raises(TargetError, match="unknown CPU 'cortex-a99'"):
        parse_target("cortex-a99")
    with pytest.raises(TargetError, match="must start with"):
        parse_target("cortex-a76,dotprod")


def test_target_from_env_reads_the_override_and_refuses_another_architecture():
    host = host_target()
    assert target_from_env({}) == host
    same_arch = "haswell" if host.is_x86 else "cortex-a72"
    assert target_from_env({TARGET_ENV: same_arch}) == parse_target(same_arch)
    other = "cortex-a76" if host.is_x86 else "haswell"
    with pytest.raises(TargetError, match="can only emit its assembly"):
        target_from_env({TARGET_ENV: other})


def _int8_module(target: Target):
    """The matvec and a matmul tile of SmolLM2's types, a 6-bit K-quant and IQ4_XS (every dot4 caller)."""
    types = (QType.Q4_0, QType.Q8_0, QType.Q6_K, QType.IQ4_XS)
    return build_module([KernelSpec(Op.MATVEC, q) for q in types] + [KernelSpec(Op.MATMUL, types[0], 3)], target)


def test_cortex_a76_uses_sdot_and_cortex_a72_plain_neon():
    """Assembly only (this machine need not run it): Pi 5's core gets the ARMv8.2 dot product, Pi 4's
    (which has none) widening multiplies and pairwise adds."""
    a76, a72 = parse_target("cortex-a76"), parse_target("cortex-a72")
    asm76, asm72 = emit_assembly(_int8_module(a76), a76), emit_assembly(_int8_module(a72), a72)
    assert re.search(r"\bsdot\s+v\d+\.4s", asm76)
    assert "sdot" not in asm72 and "udot" not in asm72
    assert re.search(r"\bsmull2?\s+v\d+\.8h", asm72) and re.search(r"\bsaddlp\s+v\d+\.4s", asm72)
    assert re.search(r"\btbl\s+v\d+\.16b", asm76) and re.search(r"\btbl\s+v\d+\.16b", asm72)  # IQ4's table


def test_every_quant_type_compiles_for_both_pis():
    for cpu in ("cortex-a76", "cortex-a72"):
        t = parse_target(cpu)
        asm = emit_assembly(build_module([KernelSpec(Op.MATVEC, q) for q in QUANT_WEIGHTS], t), t)
        assert ("sdot" in asm) == (cpu == "cortex-a76")


# --- under qemu-aarch64 -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sysroot() -> Path:
    return sysroot_or_skip()


def sysroot_or_skip() -> Path:
    """The aarch64 sysroot's directory; skips the test, saying why, where it or qemu is missing."""
    if QEMU is None:
        pytest.skip("no qemu-aarch64-static (apt install qemu-user-static; .ci/run does)")
    if not (AARCH64_DIR / ".stamp").is_file():
        pytest.skip(f"no aarch64 sysroot in {AARCH64_DIR}: run .ci/aarch64-sysroot.sh (.ci/run does)")
    return AARCH64_DIR


@pytest.fixture(scope="module")
def arm_cache(tmp_path_factory) -> Path:
    """One JIT cache for the qemu processes of this module (all cortex-a76): SmolLM2's program and packed
    weights are compiled and packed under emulation once, then loaded (the cache key holds the target)."""
    return tmp_path_factory.mktemp("arm-cache")


def qemu_env(sysroot: Path, cache: Path, target_cpu: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "DLLP2P_"))}
    env.update(QEMU_CPU="max", PYTHONPATH=f"{sysroot / 'site'}:{ROOT}", DLLP2P_CACHE_DIR=str(cache),
               PYTHONDONTWRITEBYTECODE="1", DLLP2P_KEY_FILE="off")  # not the machine's own key (conftest)
    if target_cpu:
        env[TARGET_ENV] = target_cpu
    return env


def qemu_python(sysroot: Path) -> list[str]:
    return [QEMU, "-L", str(sysroot / "sysroot"), str(sysroot / "sysroot/usr/bin/python3.11")]


@pytest.fixture(scope="module")
def model_file() -> Path:
    from dllp2p.models import NoModel, default_model_path
    try:
        return default_model_path()
    except NoModel as e:
        pytest.skip(str(e))


def x86_run(model_file: Path, tmp: Path) -> str:
    env = {**os.environ, "DLLP2P_CACHE_DIR": str(tmp), "PYTHONPATH": str(ROOT)}
    env.pop(TARGET_ENV, None)
    r = subprocess.run([sys.executable, "-m", "dllp2p.cli", "run", "--local", "--model", str(model_file), *PROMPT],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def cluster_status(port: int) -> dict | None:
    r = subprocess.run([sys.executable, "-m", "dllp2p.cli", "status", "--port", str(port), "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else None


@pytest.mark.slow
def test_x86_daemon_and_aarch64_daemon_give_the_single_node_text(sysroot, model_file, arm_cache, tmp_path):
    """A mixed cluster on loopback: an x86 daemon (started first: the root) and an aarch64 daemon under
    qemu (own ports, own cluster name, no mDNS: each names the other with --peer) agree on membership;
    `dllp2p run --daemon` through the x86 one splits SmolLM2 over both (exact exchange): the
    single-node text."""
    want = x86_run(model_file, tmp_path / "x86-single")
    ports = free_port(), free_port()
    name = f"mixed-{os.getpid()}"

    def daemon_args(i: int) -> list[str]:
        return ["-m", "dllp2p.cli", "daemon", "--host", "127.0.0.1", "--port", str(ports[i]), "--threads", "1",
                "--state-dir", str(tmp_path / f"state{i}"), "--cluster", name, "--no-discovery", "--api", "off",
                "--peer", f"127.0.0.1:{ports[1 - i]}", "--model", str(model_file), "--plan", "pow2"]

    x86_env = {**os.environ, "DLLP2P_CACHE_DIR": str(tmp_path / "x86"), "PYTHONPATH": str(ROOT)}
    x86_env.pop(TARGET_ENV, None)
    logs: dict[int, list[str]] = {0: [], 1: []}
    procs = [subprocess.Popen([sys.executable, *daemon_args(0)], stderr=subprocess.PIPE, text=True, env=x86_env,
                              cwd=ROOT)]
    try:
        time.sleep(1.0)  # the x86 daemon is the older one: the root
        procs.append(subprocess.Popen([*qemu_python(sysroot), *daemon_args(1)], stderr=subprocess.PIPE, text=True,
                                      env=qemu_env(sysroot, arm_cache, "cortex-a76"), cwd=ROOT))
        for i, p in enumerate(procs):
            threading.Thread(target=lambda p=p, i=i: logs[i].extend(p.stderr), daemon=True).start()
        want_members = {f"127.0.0.1:{port}" for port in ports}
        deadline = time.monotonic() + 180
        while True:
            st = cluster_status(ports[0])
            if st and {n["address"] for n in st["nodes"]} == want_members and \
                    [n["address"] for n in st["nodes"] if n["role"] == "root"] == [f"127.0.0.1:{ports[0]}"]:
                break
            assert all(p.poll() is None for p in procs), f"a daemon exited: {logs}"
            assert time.monotonic() < deadline, f"no agreement: {st}\n{logs}"
            time.sleep(1.0)
        r = subprocess.run([sys.executable, "-m", "dllp2p.cli", "run", *PROMPT, "--daemon", f"127.0.0.1:{ports[0]}"],
                           capture_output=True, text=True, env=x86_env, cwd=ROOT, timeout=540)
        assert r.returncode == 0, f"{r.stderr}\n{logs}"
        assert r.stdout == want and want.startswith(" Paris"), f"{r.stderr}\n{logs}"
        # the aarch64 daemon computed a slice of it (its log: "session of epoch E: node 1 of 2")
        assert any(re.search(r"\bnode 1 of 2\b", line) for line in logs[1]), logs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


@pytest.mark.slow
def test_logits_under_qemu_equal_x86(sysroot, model_file, arm_cache, tmp_path):
    """The same greedy continuation's logits (9 positions) on x86 and on aarch64 (sdot path, under qemu):
    the integer dots are exact on both and the float code is the same IR, which LLVM does not reorder
    (no fast-math) and contracts to FMA on both (llvm.fmuladd): bit-identical, measured (0 difference),
    where the x86 host has FMA; on one without, within 1e-3 absolute (logits of magnitude 10-30)."""
    import numpy as np

    x86_out, arm_out = tmp_path / "x86.npy", tmp_path / "arm.npy"
    env = {**os.environ, "DLLP2P_CACHE_DIR": str(tmp_path / "x86"), "PYTHONPATH": str(ROOT)}
    env.pop(TARGET_ENV, None)
    r = subprocess.run([sys.executable, str(TESTS / "aarch64_logits.py"), str(model_file), str(x86_out)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*qemu_python(sysroot), str(TESTS / "aarch64_logits.py"), str(model_file), str(arm_out)],
                       capture_output=True, text=True, env=qemu_env(sysroot, arm_cache, "cortex-a76"),
                       cwd=ROOT, timeout=480)
    assert r.returncode == 0, r.stderr
    want, got = np.load(x86_out), np.load(arm_out)
    assert got.shape == want.shape and np.isfinite(got).all()
    np.testing.assert_array_equal(got.argmax(axis=1), want.argmax(axis=1))
    diff = float(np.abs(got - want).max())
    print(f"max |logit(aarch64) - logit(x86)| = {diff:.3g}")
    if host_target().has("fma"):
        np.testing.assert_array_equal(got, want)
    assert diff <= 1e-3


@pytest.mark.parametrize("value,message", [("cortex-a99", "unknown CPU 'cortex-a99'"),
                                           ("cortex-a76" if host_target().is_x86 else "haswell", "can only emit")])
def test_cli_refuses_a_bad_target_at_start(tmp_path, value, message):
    """DLLP2P_TARGET_CPU is checked when the command starts, before any model is read: a one-line error."""
    env = {**os.environ, TARGET_ENV: value, "DLLP2P_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "dllp2p.cli", "run", "--local", "--model", str(tmp_path / "none.gguf"),
                        "--prompt", "x"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode != 0 and message in r.stderr and "none.gguf" not in r.stderr, r.stderr
    assert r.stderr.startswith("dllp2p: error: DLLP2P_TARGET_CPU")
