"""The scheduler: plans cover every head and row once, aligned, deterministic; pow2 sizes; clear errors."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dllp2p.formats import ModelConfig
from dllp2p.scheduler import (
    BLOCK_ROWS,
    Peer,
    Plan,
    PlanError,
    apportion,
    check_plan_fits,
    model_fingerprint,
    plan,
    validate_plan,
)


def _config(n_kv=3, group=3, head_dim=64, ffn_dim=1536, vocab=49152, tied=True) -> ModelConfig:
    n_heads = n_kv * group
    return ModelConfig(
        arch="llama", dim=n_heads * head_dim, n_layers=30, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
        ffn_dim=ffn_dim, vocab_size=vocab, context_length=8192, rope_base=100000.0, rope_dim=head_dim,
        norm_eps=1e-5, tied_output=tied,
    )


SMOLLM2 = _config()  # 9 heads, 3 KV heads, head_dim 64, FFN 1536, vocab 49152
LLAMA_8KV = _config(n_kv=8, group=4, ffn_dim=5632, vocab=32000, tied=False)


def _peers(*capacities: float) -> list[Peer]:
    return [Peer(f"n{i}", f"10.0.0.{i}:9999", 2, c) for i, c in enumerate(capacities)]


def _layout(p: Plan) -> list[tuple]:
    return [(n.node_id, n.kv_heads, n.q_heads, n.ffn_rows, n.vocab_rows) for n in p.nodes]


# --- the shapes the issue names ---


def test_smollm2_on_two_nodes_is_two_plus_one_kv_heads():
    p = plan(SMOLLM2, _peers(1, 1), epoch=1)
    assert _layout(p) == [
        ("n0", (0, 2), (0, 6), (0, 768), (0, 24576)),
        ("n1", (2, 3), (6, 9), (768, 1536), (24576, 49152)),
    ]
    assert p.nodes[0].q_rows == (0, 384) and p.nodes[1].kv_rows == (128, 192)


def test_smollm2_on_three_nodes_needs_the_weighted_policy():
    assert plan(SMOLLM2, _peers(1, 1, 1), epoch=0).n_nodes == 2  # pow2: 2 <= 3
    p = plan(SMOLLM2, _peers(1, 1, 1), epoch=0, policy="weighted")
    assert [n.kv_heads for n in p.nodes] == [(0, 1), (1, 2), (2, 3)]
    assert [n.ffn_rows for n in p.nodes] == [(0, 512), (512, 1024), (1024, 1536)]


@pytest.mark.parametrize("n_peers,n_nodes", [(1, 1), (2, 2), (3, 2), (4, 4), (7, 4), (8, 8), (20, 16), (40, 32)])
def test_pow2_node_counts_on_8_kv_heads(n_peers, n_nodes):
    p = plan(LLAMA_8KV, _peers(*[1] * n_peers), epoch=0)
    assert p.n_nodes == n_nodes
    if n_nodes <= 8:
        per = 8 // n_nodes
        assert [n.kv_heads for n in p.nodes] == [(i * per, (i + 1) * per) for i in range(n_nodes)]
    else:  # more nodes than KV heads: each KV head (group of 4 query heads) replicated on n / 8 nodes
        share = n_nodes // 8
        assert [n.kv_heads for n in p.nodes] == [(i // share, i // share + 1) for i in range(n_nodes)]
        assert [n.q_heads for n in p.nodes] == [(i * 32 // n_nodes, (i + 1) * 32 // n_nodes) for i in range(n_nodes)]


def test_one_kv_head_on_two_and_four_nodes_replicates_it():
    gemma = ModelConfig(arch="gemma3", dim=640, n_layers=18, n_heads=4, n_kv_heads=1, head_dim=256, ffn_dim=2048,
                        vocab_size=262144, context_length=32768, rope_base=1e6, rope_dim=256, norm_eps=1e-6,
                        tied_output=True)
    for n_nodes in (2, 4):
        p = plan(gemma, _peers(*[1] * n_nodes), epoch=0, block=256)
        assert [n.kv_heads for n in p.nodes] == [(0, 1)] * n_nodes
        per = 4 // n_nodes
        assert [n.q_heads for n in p.nodes] == [(i * per, (i + 1) * per) for i in range(n_nodes)]
        assert all(n.ffn_rows[0] % 256 == 0 for n in p.nodes) and p.nodes[-1].ffn_rows[1] == 2048
    assert plan(gemma, _peers(*[1] * 8), epoch=0).n_nodes == 4  # one query head each at most
    # q8 cuts attn_output by columns at q0 * head_dim: with K-quants those must be whole super-blocks
    qwen = dataclasses.replace(gemma, n_heads=14, n_kv_heads=2, head_dim=64, dim=896, ffn_dim=4864)
    assert plan(qwen, _peers(1, 1), epoch=0, exchange="q8", block=32).n_nodes == 2  # 7 heads: column 448
    with pytest.raises(PlanError, match="not a multiple of the block 256"):
        plan(qwen, _peers(1, 1), epoch=0, exchange="q8", block=256)
    with pytest.raises(PlanError, match="multiple of 256"):  # a K-quant cut must not split a super-block
        r = dataclasses.replace
        validate_plan(r(p, nodes=(r(p.nodes[0], ffn_rows=(0, 544)), r(p.nodes[1], ffn_rows=(544, 1024)), *p.nodes[2:])))


def test_weighted_slices_follow_capacity():
    p = plan(LLAMA_8KV, _peers(3, 1), epoch=0, policy="weighted")
    assert [n.kv_heads for n in p.nodes] == [(0, 6), (6, 8)]
    assert [n.ffn_rows for n in p.nodes] == [(0, 4224), (4224, 5632)]  # 176 blocks: 132 + 44
    assert [n.vocab_rows for n in p.nodes] == [(0, 24000), (24000, 32000)]  # 1000 blocks: 750 + 250


def test_root_is_always_in_and_first_and_the_fastest_others_join():
    p = plan(LLAMA_8KV, [Peer("root", "", 1, 0.1), *_peers(1, 5, 3)], epoch=0)  # pow2 of 4 peers: 4
    assert [n.node_id for n in p.nodes] == ["root", "n1", "n2", "n0"]
    p = plan(LLAMA_8KV, [Peer("root", "", 1, 0.1), *_peers(1, 5, 3)], epoch=0, max_nodes=2)
    assert [n.node_id for n in p.nodes] == ["root", "n1"]


@pytest.mark.parametrize(
    "total,weights,expected",
    [
        (3, [1, 1], (2, 1)),
        (3, [1, 1, 1], (1, 1, 1)),
        (8, [1, 1, 1], (3, 3, 2)),
        (8, [3, 1], (6, 2)),
        (4, [1, 3], (1, 3)),
        (3, [100, 1, 1], (1, 1, 1)),  # every share >= 1, taken from the share most over its quota
        (5, [100, 1, 1], (3, 1, 1)),
        (10, [1, 1, 1, 1], (3, 3, 2, 2)),
        (7, [0.5, 0.25, 0.25], (3, 2, 2)),  # quotas 3.5, 1.75, 1.75: remainders .75 beat .5
    ],
)
def test_apportion_table(total, weights, expected):
    assert apportion(total, [Fraction(w) for w in weights]) == expected


# --- errors ---


def test_no_peers():
    with pytest.raises(PlanError, match="without peers"):
        plan(SMOLLM2, [], epoch=0)


@pytest.mark.parametrize("capacity", [0, -1.0, float("nan"), float("inf"), True, "fast", None])
def test_bad_capacity(capacity):
    with pytest.raises(PlanError, match="capacity"):
        Peer("a", "h:1", 1, capacity)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(node_id=""), "node id"),
        (dict(threads=0), "threads"),
        (dict(threads=1.5), "threads"),
    ],
)
def test_bad_peer_fields(kwargs, match):
    with pytest.raises(PlanError, match=match):
        Peer(**{**dict(node_id="a", address="h:1", threads=1, capacity=1.0), **kwargs})


def test_duplicate_ids_unknown_policy_bad_epoch_bad_max_nodes():
    with pytest.raises(PlanError, match="duplicate node ids: a"):
        plan(SMOLLM2, [Peer("a", "", 1, 1), Peer("b", "", 1, 1), Peer("a", "", 1, 1)], epoch=0)
    with pytest.raises(PlanError, match="unknown scheduling policy 'even'"):
        plan(SMOLLM2, _peers(1), epoch=0, policy="even")
    with pytest.raises(PlanError, match="epoch"):
        plan(SMOLLM2, _peers(1), epoch=-1)
    with pytest.raises(PlanError, match="max_nodes"):
        plan(SMOLLM2, _peers(1), epoch=0, max_nodes=0)
    with pytest.raises(PlanError, match="unknown exchange 'f16' \\(known: exact, q8\\)"):
        plan(SMOLLM2, _peers(1), epoch=0, exchange="f16")
    assert plan(SMOLLM2, _peers(1), epoch=0).exchange == "exact"  # bit-identical to one node unless asked
    assert plan(SMOLLM2, _peers(1), epoch=0, exchange="q8").exchange == "q8"


def test_models_that_cannot_be_split():
    bad_groups = dataclasses.replace(SMOLLM2, n_heads=8)
    with pytest.raises(PlanError, match="8 heads cannot be grouped over 3 KV heads"):
        plan(bad_groups, _peers(1), epoch=0)
    tiny_ffn = _config(n_kv=8, group=1, ffn_dim=64)
    with pytest.raises(PlanError, match="64 FFN rows cannot give 4 nodes"):
        plan(tiny_ffn, _peers(1, 1, 1, 1), epoch=0)


def _tamper(p: Plan, i: int, **changes) -> dict:
    nodes = list(p.nodes)
    nodes[i] = dataclasses.replace(nodes[i], **changes)
    return {f.name: getattr(p, f.name) for f in dataclasses.fields(p)} | {"nodes": tuple(nodes)}


@pytest.mark.parametrize(
    "i,changes,match",
    [
        (1, dict(kv_heads=(3, 4), q_heads=(9, 12)), r"kv_heads \[3, 4\) does not follow"),
        (0, dict(kv_heads=(0, 1), q_heads=(0, 3)), r"kv_heads \[2, 3\) does not follow"),
        (0, dict(q_heads=(0, 5)), "q_heads"),
        (0, dict(ffn_rows=(0, 700)), r"ffn_rows \[768, 1536\) does not follow"),
        (1, dict(ffn_rows=(768, 1500)), "ffn_rows end at 1500"),
        (1, dict(vocab_rows=(24576, 49153)), "vocab_rows end at 49153"),
        (1, dict(index=5), "index is 5"),
        (1, dict(node_id="n0"), "duplicate node ids"),
        (1, dict(head_dim=32), "head_dim"),
        (1, dict(kv_heads=[2, 3]), "pair of ints"),
    ],
)
def test_invalid_plans_are_refused(i, changes, match):
    fields = _tamper(plan(SMOLLM2, _peers(1, 1), epoch=3), i, **changes)
    with pytest.raises(PlanError, match=match):
        Plan(**fields)


def test_misaligned_ffn_split_is_refused():
    p = plan(SMOLLM2, _peers(1, 1), epoch=0)
    fields = _tamper(p, 0, ffn_rows=(0, 770))
    fields["nodes"] = (fields["nodes"][0], dataclasses.replace(p.nodes[1], ffn_rows=(770, 1536)))
    with pytest.raises(PlanError, match=f"ffn_rows start 770 is not a multiple of {BLOCK_ROWS}"):
        Plan(**fields)


def test_check_plan_fits():
    p = plan(SMOLLM2, _peers(1, 1), epoch=0)
    check_plan_fits(p, SMOLLM2)
    with pytest.raises(PlanError, match="is for model"):
        check_plan_fits(p, dataclasses.replace(SMOLLM2, n_layers=2))
    with pytest.raises(PlanError, match="the model is"):
        check_plan_fits(p, LLAMA_8KV)
    assert plan(SMOLLM2, _peers(1), epoch=0, model="abc").model == "abc"
    assert model_fingerprint(SMOLLM2) == model_fingerprint(_config()) != model_fingerprint(LLAMA_8KV)


# --- properties over model shapes and peer sets ---


@st.composite
def configs(draw) -> ModelConfig:
    n_kv = draw(st.integers(1, 16))
    group = draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([32, 64, 128]))
    ffn_dim = draw(st.integers(16, 400)) * 32 + draw(st.sampled_from([0, 0, 0, 8]))
    vocab = draw(st.integers(512, 60000))
    return _config(n_kv=n_kv, group=group, head_dim=head_dim, ffn_dim=ffn_dim, vocab=vocab)


peer_sets = st.lists(
    st.floats(0.01, 100.0, allow_nan=False, allow_infinity=False), min_size=1, max_size=12
).map(lambda caps: _peers(*caps))


@settings(max_examples=150, deadline=None)
@given(configs(), peer_sets, st.sampled_from(["pow2", "weighted"]), st.integers(0, 2**40))
def test_plans_cover_everything_once_aligned_and_deterministic(config, peers, policy, epoch):
    p = plan(config, peers, epoch, policy)
    validate_plan(p)  # also run by Plan itself; the explicit checks below restate it
    assert p.epoch == epoch and p.nodes[0].node_id == "n0" and p.model == model_fingerprint(config)
    fits = [k for k in range(1, len(peers) + 1)  # whole KV groups, or an even share of each group's heads
            if k <= config.n_kv_heads or (k % config.n_kv_heads == 0 and k <= config.n_heads)]
    limit = max(fits) if policy == "weighted" else max(k for k in fits if k & (k - 1) == 0)
    if policy == "pow2":
        assert p.n_nodes & (p.n_nodes - 1) == 0 and p.n_nodes <= limit < 2 * p.n_nodes
    else:
        assert p.n_nodes == limit
    for field, total in (("q_heads", config.n_heads), ("ffn_rows", config.ffn_dim),
                         ("vocab_rows", config.vocab_size)):
        ranges = [getattr(n, field) for n in p.nodes]
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])) and all(r[0] < r[1] for r in ranges)
        if field != "q_heads":
            assert all(r[0] % 32 == 0 for r in ranges)
    g = config.group_size
    if p.n_nodes <= config.n_kv_heads:
        assert all(n.q_heads == (n.kv_heads[0] * g, n.kv_heads[1] * g) for n in p.nodes)
    else:
        assert all(n.kv_heads == (n.q_heads[0] // g, n.q_heads[0] // g + 1) for n in p.nodes)
        assert all(n.q_heads[0] // g == (n.q_heads[1] - 1) // g for n in p.nodes)
    assert p.nodes[-1].q_rows[1] == config.q_dim and p.nodes[-1].kv_rows[1] == config.kv_dim
    assert plan(config, peers, epoch, policy) == p  # same input, same plan
    shuffled = [peers[0], *reversed(peers[1:])]
    assert plan(config, shuffled, epoch, policy) == p  # discovery order of the others does not matter


@settings(max_examples=100, deadline=None)
@given(configs(), peer_sets)
def test_pow2_slices_are_equal_when_heads_divide(config, peers):
    p = plan(config, peers, 0)
    sizes = {n.kv_heads[1] - n.kv_heads[0] for n in p.nodes}
    if p.n_nodes > config.n_kv_heads:  # KV heads replicated: one each, the query heads shared out evenly
        q_sizes = [n.q_heads[1] - n.q_heads[0] for n in p.nodes]
        assert sizes == {1} and max(q_sizes) - min(q_sizes) <= 1
    elif config.n_kv_heads % p.n_nodes == 0:
        assert sizes == {config.n_kv_heads // p.n_nodes}
    else:
        assert max(sizes) - min(sizes) == 1
    ffn_blocks = [-(-(n.ffn_rows[1] - n.ffn_rows[0]) // 32) for n in p.nodes]
    assert max(ffn_blocks) - min(ffn_blocks) <= 1


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 3000), st.lists(st.integers(1, 1000), min_size=1, max_size=16))
def test_apportion_sums_and_stays_within_one_of_the_quota(total, ints):
    weights = [Fraction(w) for w in ints]
    if total < len(weights):
        with pytest.raises(PlanError):
            apportion(total, weights)
        return
    shares = apportion(total, weights)
    assert sum(shares) == total and min(shares) >= 1
    quotas = [total * w / sum(weights) for w in weights]
    if min(quotas) >= 1:  # no share had to be raised to 1: Hamilton's quota property
        assert all(q - 1 < s < q + 1 for s, q in zip(shares, quotas))
