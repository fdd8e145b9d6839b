"""The int8 kernels under qemu-aarch64 against their numpy twins, for both Pis' code paths (Cortex-A72:
plain NEON; Cortex-A76: sdot); tests/aarch64_kernels.py does the checks inside the emulated process.
A file of its own so that pytest-xdist (--dist loadfile) runs it beside test_aarch64.py's SmolLM2 runs
under qemu instead of after them: each is minutes of emulation on one core. Skips as test_aarch64.py's
qemu tests do when the sysroot or qemu-aarch64-static is missing (.ci/run builds both)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from test_aarch64 import ROOT, TESTS, qemu_env, qemu_python, sysroot_or_skip


@pytest.fixture(scope="module")
def sysroot() -> Path:
    return sysroot_or_skip()


@pytest.mark.parametrize("cpu", ["cortex-a72", "cortex-a76"])
def test_kernels_under_qemu_match_the_numpy_twins(sysroot, tmp_path, cpu):
    r = subprocess.run([*qemu_python(sysroot), str(TESTS / "aarch64_kernels.py")], capture_output=True, text=True,
                       env=qemu_env(sysroot, tmp_path, cpu), cwd=ROOT, timeout=480)
    assert r.returncode == 0, r.stdout + r.stderr
    isa = "dotprod" if cpu == "cortex-a76" else "neon"
    assert f"{cpu} " in r.stdout and f"dot_isa={isa}" in r.stdout
    m = re.search(r"^ok (\d+) checks", r.stdout, re.M)
    assert m and int(m.group(1)) == 22 == len(re.findall(r"(within the bound|bit-exact)$", r.stdout, re.M)), r.stdout
