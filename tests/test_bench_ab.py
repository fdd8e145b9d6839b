"""The same-process A/B harness (dllp2p/jit/bench_ab.py): another build imported beside this one, engines
parked and unparked between turns, the statistics it reports.

The "old" build here is a copy of this very checkout (a directory holding dllp2p), so its engine must give
this build's logits bit for bit: the harness compares like with like (same weights mapping, same positions).
"""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

import dllp2p
from dllp2p.formats import load_model
from dllp2p.formats.synthetic import SyntheticSpec, write_random_llama
from dllp2p.jit import bench_ab
from dllp2p.jit.weights import load_packed

CHECKOUT = Path(dllp2p.__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ab")
    model = write_random_llama(tmp / "small.gguf", SyntheticSpec(dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                                                                  ffn_dim=256, vocab_size=320))
    return tmp, model, tmp / "cache"


def test_median_ci_is_order_statistics_of_the_binomial():
    # n = 10: P(Binomial(10, 1/2) <= 1) = 11/1024 <= 0.025 < P(<= 2) = 56/1024, so the 2nd and 9th values
    assert bench_ab.median_ci([float(x) for x in range(10, 0, -1)]) == (2.0, 9.0)
    assert bench_ab.median_ci([3.0, 1.0]) == (1.0, 3.0)  # too few rounds for 95 %: the whole range


def test_old_build_beside_this_one_gives_the_same_logits(setup):
    tmp, model, cache = setup
    pkg = bench_ab.import_old(str(CHECKOUT), tmp / "pkgs", name="dllp2p_abtest")
    packed = load_packed(load_model(model), cache / "weights")
    prompt, ctx = list(range(3, 11)), 24
    old = bench_ab.build_variant("old", str(model), ctx, 2, pkg, packed, tmp, cache)
    new = bench_ab.build_variant("new", str(model), ctx, 2, pkg, packed, tmp, cache)
    try:
        assert type(old).__module__ == "dllp2p_abtest.jit.engine" and type(new).__module__ == "dllp2p.jit.engine"
        assert old.packed is new.packed  # one mapping of the weights for both
        logits = []
        for engine in (old, new):
            engine.forward(prompt, 0)
            bench_ab.park(engine)
            assert engine._workers == []
            times, cpu = bench_ab.turn(engine, [5, 7, 9], len(prompt))  # unparks, decodes, parks again
            assert len(times) == 3 and all(t > 0 for t in times) and cpu >= 0
            bench_ab.unpark(engine)
            logits.append(engine.forward([9], len(prompt) + 2).copy())
            bench_ab.park(engine)
            bench_ab.unpark(engine)  # a second park/unpark: the go-counter restarts from 0 each time
            np.testing.assert_array_equal(engine.forward([9], len(prompt) + 2), logits[-1])
        np.testing.assert_array_equal(logits[0], logits[1])
    finally:
        for engine in (old, new):
            if not engine._workers:
                bench_ab.unpark(engine)
            engine.close()


def test_main_prints_paired_ratios(setup):
    tmp, model, cache = setup
    out = io.StringIO()
    with redirect_stdout(out):
        rc = bench_ab.main(["--old", str(CHECKOUT), "--variants", "old,new", "--model", str(model),
                            "--threads", "2", "--tokens", "3", "--rounds", "3", "--prompt-tokens", "4",
                            "--cache-dir", str(cache)])
    text = out.getvalue()
    assert rc == 0
    for name in ("old", "new"):
        assert f"\n  {name} " in text
    assert "new / old, paired by round:" in text
    assert text.count("95% CI") == 3  # tok/s, median step time, thread 0 CPU
