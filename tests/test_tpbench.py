"""`python -m dllp2p.tpbench` on a small random model: nodes in their own processes, both exchanges,
byte counts as tp_program computes them, exact's logits identical to one node's, and every cluster
measured in every round."""

from __future__ import annotations

import json
import subprocess
import sys

from dllp2p.formats import QType
from dllp2p.formats.synthetic import SyntheticSpec, write_random_llama
from dllp2p.jit.layout import q8_0_bytes


def test_tpbench_json(tmp_path):
    spec = SyntheticSpec(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=512, vocab_size=512, qtype=QType.Q4_0)
    path = write_random_llama(tmp_path / "tiny.gguf", spec)
    out = subprocess.run([sys.executable, "-m", "dllp2p.tpbench", "--model", str(path), "--layout", "1:1", "2:1",
                          "--tokens", "3", "--rounds", "2", "--prompt-tokens", "5", "--json"], capture_output=True, text=True, timeout=300,
                         env={"DLLP2P_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    rows = {(r["nodes"], r["exchange"]): r for r in json.loads(out.stdout)["results"]}
    assert set(rows) == {(1, "exact"), (2, "exact"), (2, "q8")}
    assert rows[(2, "exact")]["identical_to_first_layout"] and rows[(2, "exact")]["max_abs_logit_diff"] == 0
    assert 0 < rows[(2, "q8")]["max_abs_logit_diff"] < 1
    q8 = rows[(2, "q8")]
    sent = spec.n_layers * 2 * q8_0_bytes(spec.dim)  # two all-reduces per layer, one token
    sent += spec.dim * 4  # and the token's embedding row (each node looks up the tokens of its vocabulary rows)
    # greedy decode: node 1 sends its best logit only, one (f32, i32) record
    assert (q8["root_bytes_sent"], q8["root_bytes_received"]) == (sent, sent + 8)
    assert all(r["ms_per_token"] > 0 and r["sync_ms_per_token"] >= 0 for r in rows.values())
    # every cluster decoded in each of the 2 rounds; the first is the baseline of the round-by-round ratio
    assert all(len(r["round_ms_per_token"]) == 2 and r["vs_first"] > 0 for r in rows.values())
    assert rows[(1, "exact")]["vs_first"] == 1.0


def test_tpbench_encrypt_both(tmp_path):
    """--encrypt both: each multi-node cluster plain and sealed; sealed logits identical, 16 more bytes
    per message (per token: the embedding swap, 2 all-reduces per layer; node 1's best logit)."""
    spec = SyntheticSpec(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=512, vocab_size=512, qtype=QType.Q4_0)
    path = write_random_llama(tmp_path / "tiny.gguf", spec)
    out = subprocess.run([sys.executable, "-m", "dllp2p.tpbench", "--model", str(path), "--layout", "2:1",
                          "--exchange", "q8", "--encrypt", "both", "--tokens", "2", "--rounds", "2",
                          "--prompt-tokens", "5", "--json"], capture_output=True, text=True, timeout=300,
                         env={"DLLP2P_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    plain, sealed = json.loads(out.stdout)["results"]
    assert (plain["sealed"], sealed["sealed"]) == (False, True)
    assert sealed["identical_to_first_layout"] and sealed["max_abs_logit_diff"] == 0
    messages = 1 + 2 * spec.n_layers
    assert sealed["root_bytes_sent"] == plain["root_bytes_sent"] + 16 * messages
    assert sealed["root_bytes_received"] == plain["root_bytes_received"] + 16 * (messages + 1)
