"""Slicing: each node's tensors are exact pieces of the model's, and the pieces add up to the whole layer.

The tensor-parallel check runs one layer in numpy float32 twice: whole, and as the sum of every node's
partial attention and FFN outputs computed from that node's slices only (the two exchanges per layer).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from dllp2p.formats import QType, load_model
from dllp2p.formats.synthetic import SyntheticSpec, write_random_llama
from dllp2p.reference import apply_rope, rmsnorm, rope_tables, silu
from dllp2p.scheduler import Peer, plan
from dllp2p.slicing import ALL, SliceError, SliceSpec, cut, node_tensors, slice_specs

# 8 KV heads, group 2, head_dim 32; FFN of 22 blocks and a vocabulary that is not whole blocks
SPEC_8KV = SyntheticSpec(dim=512, n_layers=2, n_heads=16, n_kv_heads=8, ffn_dim=704, vocab_size=300,
                         qtype=QType.Q4_0, embed_qtype=QType.Q8_0)
# SmolLM2's grouping (3 KV heads, group 3, head_dim 64), tied output, Q4_1 like the real model
SPEC_3KV = SyntheticSpec(dim=576, n_layers=1, n_heads=9, n_kv_heads=3, ffn_dim=320, vocab_size=384,
                         qtype=QType.Q4_1, embed_qtype=QType.Q8_0, tied_output=True)
# float storage: column slices are plain array slices
SPEC_F16 = SyntheticSpec(dim=192, n_layers=1, n_heads=6, n_kv_heads=3, ffn_dim=96, vocab_size=300,
                         qtype=QType.F16, embed_qtype=QType.F32)

CASES = [("8kv", 1), ("8kv", 2), ("8kv", 4), ("8kv", 8), ("3kv", 2), ("3kv", 3), ("f16", 2), ("f16", 3)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("slicing")
    specs = {"8kv": SPEC_8KV, "3kv": SPEC_3KV, "f16": SPEC_F16}
    return {k: load_model(write_random_llama(d / f"{k}.gguf", s)) for k, s in specs.items()}


def _plan(model, n_nodes):
    peers = [Peer(f"n{i}", "", 1, 1.0 + i % 3) for i in range(n_nodes)]  # uneven capacities
    policy = "pow2" if n_nodes & (n_nodes - 1) == 0 else "weighted"
    p = plan(model.config, peers, epoch=0, policy=policy)
    assert p.n_nodes == n_nodes
    return p


@pytest.fixture(scope="module")
def sliced(models):
    """(model key, n nodes) -> (model, plan, [node tensors per node])."""
    out = {}
    for key, n in CASES:
        m = models[key]
        p = _plan(m, n)
        out[key, n] = (m, p, [node_tensors(m, node) for node in p.nodes])
    return out


@pytest.mark.parametrize("key,n", CASES)
def test_slices_dequantize_like_slices_of_the_whole(sliced, key, n):
    model, p, per_node = sliced[key, n]
    full = {name: t.dequantize() for name, t in model.tensors.items()}
    for node, tensors in zip(p.nodes, per_node):
        assert set(tensors) == set(slice_specs(model.config, node))
        for name, st in tensors.items():
            src = full[st.spec.source]
            r1 = src.shape[0] if st.spec.rows[1] is None else st.spec.rows[1]
            want = src[st.spec.rows[0] : r1] if src.ndim == 1 else src[st.spec.rows[0] : r1, _cols(st.spec, src)]
            got = st.dequantize()
            assert got.shape == st.shape == want.shape, name
            np.testing.assert_array_equal(got, want, err_msg=name)
            assert st.sha256 == hashlib.sha256(st.data.tobytes()).hexdigest()
            assert st.data.flags.c_contiguous and st.qtype == model.tensors[st.spec.source].qtype


def _cols(spec: SliceSpec, src: np.ndarray) -> slice:
    return slice(spec.cols[0], src.shape[1] if spec.cols[1] is None else spec.cols[1])


@pytest.mark.parametrize("key,n", CASES)
def test_node_slices_tile_every_tensor_exactly_once(sliced, key, n):
    model, p, per_node = sliced[key, n]
    c = model.config
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_up.weight", "output.weight"):
        src = model.output_tensor() if name == "output.weight" else model.tensors[name]
        joined = np.concatenate([t[name].data for t in per_node], axis=0)
        np.testing.assert_array_equal(joined, src.data, err_msg=name)
    for name in ("blk.0.attn_output.weight", "blk.0.ffn_down.weight"):  # whole blocks of raw storage
        joined = np.concatenate([t[name].data for t in per_node], axis=1)
        np.testing.assert_array_equal(joined, model.tensors[name].data, err_msg=name)
    for t in per_node:  # what every node holds whole
        np.testing.assert_array_equal(t["token_embd.weight"].data, model.tensors["token_embd.weight"].data)
        assert t["blk.0.attn_norm.weight"].shape == (c.dim,)


def test_the_same_slice_has_the_same_hash_and_ids_read_well(sliced):
    _, _, two = sliced["8kv", 2]
    _, _, four = sliced["8kv", 4]
    assert two[0]["blk.0.attn_norm.weight"].sha256 == four[3]["blk.0.attn_norm.weight"].sha256
    assert two[0]["blk.0.attn_q.weight"].sha256 != four[0]["blk.0.attn_q.weight"].sha256
    assert four[1]["blk.0.attn_output.weight"].slice_id == "blk.0.attn_output.weight[:, 128:256]"
    assert four[1]["blk.1.ffn_gate.weight"].slice_id == "blk.1.ffn_gate.weight[192:384, :]"
    assert four[0]["blk.0.ffn_norm.weight"].slice_id == "blk.0.ffn_norm.weight[:]"


def test_tied_output_is_cut_from_the_embedding(sliced):
    model, p, per_node = sliced["3kv", 3]
    assert model.config.tied_output
    out = per_node[2]["output.weight"]
    assert out.spec.source == "token_embd.weight" and out.spec.rows == p.nodes[2].vocab_rows


# --- the tensor-parallel forward of one layer equals the whole layer ---


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """q f32[T, nh, hd], k/v f32[T, nkv, hd] (nh a multiple of nkv) -> f32[T, nh * hd], causal."""
    t, nh, hd = q.shape
    group = nh // k.shape[1]
    kk, vv = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.einsum("thd,shd->hts", q, kk) / np.float32(np.sqrt(hd))
    scores = np.where(np.tril(np.ones((t, t), bool))[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.einsum("hts,shd->thd", probs, vv).reshape(t, nh * hd).astype(np.float32)


def _attention_part(w: dict, h: np.ndarray, layer: int, hd: int, cos, sin, rope_dim) -> np.ndarray:
    """From one node's (or the whole model's) f32 weights: h f32[T, dim] -> its share of Wo @ attention."""
    p = f"blk.{layer}."
    t = h.shape[0]
    q = (h @ w[p + "attn_q.weight"].T).reshape(t, -1, hd)
    k = (h @ w[p + "attn_k.weight"].T).reshape(t, -1, hd)
    v = (h @ w[p + "attn_v.weight"].T).reshape(t, -1, hd)
    q, k = apply_rope(q, cos, sin, rope_dim), apply_rope(k, cos, sin, rope_dim)
    return _attention(q, k, v) @ w[p + "attn_output.weight"].T


def _ffn_part(w: dict, h: np.ndarray, layer: int) -> np.ndarray:
    p = f"blk.{layer}."
    return (silu(h @ w[p + "ffn_gate.weight"].T) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T


def _layer(parts: list[dict], x: np.ndarray, layer: int, config, cos, sin) -> np.ndarray:
    """x f32[T, dim] -> f32[T, dim]: every part computes from its weights, the partial outputs are summed."""
    p, eps = f"blk.{layer}.", config.norm_eps
    h = rmsnorm(x, parts[0][p + "attn_norm.weight"], eps)
    x = x + sum(_attention_part(w, h, layer, config.head_dim, cos, sin, config.rope_dim) for w in parts)
    h = rmsnorm(x, parts[0][p + "ffn_norm.weight"], eps)
    return x + sum(_ffn_part(w, h, layer) for w in parts)


@pytest.mark.parametrize("key,n", CASES)
def test_tensor_parallel_layer_equals_the_whole_layer(sliced, key, n):
    model, _, per_node = sliced[key, n]
    c = model.config
    whole = {name: t.dequantize() for name, t in model.tensors.items()}
    whole["output.weight"] = model.output_tensor().dequantize()
    parts = [{name: t.dequantize() for name, t in tensors.items()} for tensors in per_node]
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, c.dim)).astype(np.float32)
    cos, sin = rope_tables(c, np.arange(6))
    want, got = x, x
    for layer in range(c.n_layers):
        want = _layer([whole], want, layer, c, cos, sin)
        got = _layer(parts, got, layer, c, cos, sin)
    assert np.abs(want).max() > 0.5  # a real signal, not vanishing noise
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    h = rmsnorm(want[-1], whole["output_norm.weight"], c.norm_eps)
    logits = np.concatenate([h @ w["output.weight"].T for w in parts])  # each node's vocabulary rows
    np.testing.assert_allclose(logits, h @ whole["output.weight"].T, rtol=1e-5, atol=1e-5)


# --- the real model and errors ---


@pytest.mark.parametrize("n", [2, 3])
def test_smollm2_slices(real_model, n):
    c = real_model.config
    p = plan(c, [Peer(f"n{i}", "", 1, 1.0) for i in range(n)], epoch=0, policy="weighted")
    per_node = [node_tensors(real_model, node) for node in p.nodes]
    kv_per_node = [node.kv_heads[1] - node.kv_heads[0] for node in p.nodes]
    assert kv_per_node == ([2, 1] if n == 2 else [1, 1, 1])
    for t, kv in zip(per_node, kv_per_node):
        assert t["blk.0.attn_q.weight"].shape == (kv * 3 * 64, 576)
        assert t["blk.0.attn_k.weight"].shape == (kv * 64, 576)
        assert t["blk.29.attn_output.weight"].shape == (576, kv * 3 * 64)
        assert t["output.weight"].shape == (49152 // n, 576)  # both splits are whole blocks
    joined = np.concatenate([t["blk.7.attn_output.weight"].data for t in per_node], axis=1)
    np.testing.assert_array_equal(joined, real_model.tensors["blk.7.attn_output.weight"].data)
    joined = np.concatenate([t["blk.7.ffn_down.weight"].data for t in per_node], axis=1)
    np.testing.assert_array_equal(joined, real_model.tensors["blk.7.ffn_down.weight"].data)


def test_misaligned_or_out_of_range_cuts(models):
    t = models["8kv"].tensors["blk.0.attn_output.weight"]
    with pytest.raises(SliceError, match=r"columns \[16, 64\) cut Q4_0 blocks of 32"):
        cut("x", t.qtype, t.shape, t.data, SliceSpec(t.name, ALL, (16, 64)))
    with pytest.raises(SliceError, match=r"rows \[0, 513\) are not a non-empty range within \[0, 512\)"):
        cut("x", t.qtype, t.shape, t.data, SliceSpec(t.name, (0, 513), ALL))
    with pytest.raises(SliceError, match="columns"):
        cut("x", t.qtype, t.shape, t.data, SliceSpec(t.name, ALL, (64, 64)))
    norm = models["8kv"].tensors["blk.0.attn_norm.weight"]
    with pytest.raises(SliceError, match="1-D"):
        cut("x", norm.qtype, norm.shape, norm.data, SliceSpec(norm.name, ALL, (0, 32)))
    f16 = models["f16"].tensors["blk.0.attn_output.weight"]
    part = cut("x", f16.qtype, f16.shape, f16.data, SliceSpec(f16.name, ALL, (5, 7)))  # float types: any columns
    np.testing.assert_array_equal(part.dequantize(), f16.dequantize()[:, 5:7])
