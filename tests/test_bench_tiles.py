"""bench_tiles: the peak loop computes what it claims (so its rate counts real dots), and the command runs."""

from __future__ import annotations

import numpy as np

from dllp2p.formats.quant import QType
from dllp2p.jit import bench_tiles


def test_peak_loop_sums_its_dots():
    fn, _compiled = bench_tiles.peak_function()
    buf = (np.arange(8 * 64) % 97).astype(np.uint8)
    vals = buf.reshape(8, 64).astype(np.int64)
    per_iteration = sum(int(vals[(c + d) % 8][:4] @ vals[(c + 3 * d + 1) % 8][:4])
                        for c in range(bench_tiles.CHAINS) for d in range(bench_tiles.DEPTH))
    for n in (1, 3, 10):
        assert fn(n, buf.ctypes.data) == n * per_iteration


def test_command_prints_the_peak_and_each_types_shares(capsys):
    assert bench_tiles.main(["--types", "Q4_0", "Q8_0", "--shape", "64", "64", "--rows", "1", "3", "--reps", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("dot peak: 1 thread") and "2 threads at once" in out[0]
    assert [line.split()[0] for line in out[1:]] == ["Q4_0", "Q8_0"]
    assert all("1 rows" in line and "3 rows" in line and "%" in line and "arithmetic alone" in line for line in out[1:])
    assert bench_tiles.tile_ops(QType.Q4_1)["fma"] == 2 * bench_tiles.tile_ops(QType.Q4_0)["fma"]  # its minimum
