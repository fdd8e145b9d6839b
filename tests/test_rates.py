"""Plans weighed by measured speed (issue 19): each node's share of the work (scheduler.node_share), its
rate meter (session/rates.py), capacities replaced by rates only when every node has one, re-planning
only when the rates moved beyond the tolerance (hysteresis), the rates on the wire, and the root's kept
session given up for a new plan when a node got slower. Fake rates throughout: no timing here."""

from __future__ import annotations

import time

import pytest
import trio

from dllp2p.config import Timeouts
from dllp2p.formats import ModelConfig
from dllp2p.scheduler import Peer, node_share, node_work, plan, rates_moved, with_rates
from dllp2p.session.rates import RateMeter
from dllp2p.session.service import RootService, _Warm
from dllp2p.wire import codec
from dllp2p.wire import messages as P

SMOLLM2 = ModelConfig(arch="llama", dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=1536,
                      vocab_size=49152, context_length=8192, rope_base=100000.0, rope_dim=64, norm_eps=1e-5,
                      tied_output=True)


def _peers(*caps: float) -> list[Peer]:
    return [Peer(f"n{i}", f"127.0.0.1:{9000 + i}", 2, c) for i, c in enumerate(caps)]


@pytest.mark.parametrize("exchange", ["exact", "q8"])
def test_node_shares_cover_the_model(exchange):
    one = plan(SMOLLM2, _peers(1), 0, exchange=exchange)
    assert node_share(one, 0, SMOLLM2.n_layers) == pytest.approx(1.0)
    two = plan(SMOLLM2, _peers(1, 1), 0, "weighted", exchange=exchange)
    shares = [node_share(two, i, SMOLLM2.n_layers) for i in range(2)]
    assert sum(shares) == pytest.approx(1.0)  # 3 KV heads: whole groups, nothing replicated
    assert shares[0] > shares[1]  # 2 of the 3 KV heads on node 0
    assert node_work(two, 0, 30) + node_work(two, 1, 30) == node_work(one, 0, 30)


def test_weighted_plan_follows_the_measured_rates():
    peers = _peers(2.0, 2.0)  # capacities: the thread counts, equal
    even = plan(SMOLLM2, with_rates(peers, [0.0, 80.0]), 1, "weighted")  # the root not measured: capacities
    assert even.nodes[0].ffn_rows == (0, 768)
    fast_root = plan(SMOLLM2, with_rates(peers, [90.0, 30.0]), 2, "weighted")  # the worker got 3x slower
    f0, f1 = fast_root.nodes[0].ffn_rows
    assert (f1 - f0) == 1152 and fast_root.nodes[0].vocab_rows[1] == 36864  # 3/4 of the rows
    assert node_share(fast_root, 0, 30) > 0.7 > node_share(even, 0, 30)


@pytest.mark.parametrize("old, new, moved", [
    ({"a": 100.0, "b": 100.0}, {"a": 110.0, "b": 95.0}, False),  # noise within the tolerance
    ({"a": 100.0, "b": 100.0}, {"a": 200.0, "b": 200.0}, False),  # both faster: the same split
    ({"a": 100.0, "b": 100.0}, {"a": 100.0, "b": 40.0}, True),  # b shares its core with a hog
    ({"a": 100.0, "b": 40.0}, {"a": 100.0, "b": 45.0}, False),  # re-planned: steady, no flapping
    ({"a": 2.0, "b": 2.0}, {"a": 100.0, "b": 95.0}, False),  # planned by capacity (threads): the same shares
    ({"a": 2.0, "b": 2.0}, {"a": 100.0, "b": 50.0}, True),  # ... or not
    ({"a": 100.0, "b": 0.0}, {"a": 100.0, "b": 60.0}, True),
    ({"a": 100.0, "b": 100.0}, {"a": 100.0}, False),  # b's rate unknown now: keep the plan
    ({"a": 100.0, "b": 100.0}, {"a": 100.0, "b": 0.0, "c": 5.0}, False),
    ({}, {"a": 1.0}, False),
])
def test_rates_moved(old, new, moved):
    assert rates_moved(old, new) is moved


def test_with_rates_never_mixes_units():
    peers = _peers(4.0, 2.0)
    assert with_rates(peers, [50.0, 0.0]) == peers
    assert [p.capacity for p in with_rates(peers, [50.0, 25.0])] == [50.0, 25.0]


def test_meter_counts_decode_compute_only():
    m = RateMeter(window=3)
    assert m.rate == 0.0
    m.add_step(0.5, 10.0, 32)  # a prefill chunk: not counted
    m.add_step(0.5, 0.0, 1)  # nothing measured
    assert m.rate == 0.0
    for ms in (10.0, 20.0, 10.0, 12.5):  # half the model in 10 ms: 50 whole-model tokens/s
        m.add_step(0.5, ms, 1)
    assert m.rate == pytest.approx(40.0)  # the median of the last 3: 25, 50, 40
    m.add_rate(0.0)
    assert m.rate == pytest.approx(40.0)


def test_rates_on_the_wire():
    hello = P.Hello(P.PROTOCOL_VERSION, "w", "worker", 2, 2.0, rate=61.5)
    assert codec.decode_body(codec.MsgType.HELLO, codec.encode(hello)[codec.HEADER.size:]) == hello
    body = codec._to_wire(P.Hello(P.PROTOCOL_VERSION, "w", "worker", 2, 2.0), P.Hello, "Hello")
    del body["rate"]  # a sender that does not measure
    old = codec.decode_body(codec.MsgType.HELLO, codec.msgpack.packb(body, use_bin_type=True))
    assert old.rate == 0.0
    with pytest.raises(ValueError):
        P.Hello(P.PROTOCOL_VERSION, "w", "worker", 2, 2.0, rate=float("nan"))


class _Engine:
    closed = False

    def close(self) -> None:
        self.closed = True


def test_kept_session_is_given_up_when_a_node_got_slower():
    polled = {"w": 100.0}
    meter = RateMeter()
    meter.add_rate(100.0)
    service = RootService(None, "r", 2, "weighted", Timeouts(), lambda: None, meter=meter, rates=lambda: dict(polled))
    pow2 = RootService(None, "r", 2, "pow2", Timeouts(), lambda: None, meter=meter, rates=lambda: dict(polled))
    the_plan = plan(SMOLLM2, _peers(1, 1), 1, "weighted")

    async def main() -> None:
        key = (("127.0.0.1:9001",), 64)
        service._warm = _Warm(key, _Engine(), the_plan, trio.current_time() + 30, rates={"r": 100.0, "w": 100.0})
        polled["w"] = 90.0  # within the tolerance: the kept session serves
        kept = service._take_warm(key)
        assert kept is not None and not kept.engine.closed
        service._warm = kept
        polled["w"] = 30.0  # the worker shares its core with a hog now
        assert service._take_warm(key) is None
        await service.close_warm()
        assert kept.engine.closed
        # pow2 splits equally whatever the rates: its kept session serves on
        pow2._warm = _Warm(key, _Engine(), the_plan, trio.current_time() + 30, rates={"r": 100.0, "w": 100.0})
        assert pow2._take_warm(key) is not None

    trio.run(main)


def test_run_delay_grows_only_while_waiting_for_a_cpu():
    from dllp2p.session.rates import run_delay_ms

    a = run_delay_ms()
    time.sleep(0.3)  # asleep: not waiting for a CPU (only for the wake-up)
    b = run_delay_ms()
    assert 0.0 <= a <= b < a + 300.0


def test_root_plans_by_the_rates_in_the_hellos(tmp_path):
    """Two worker daemons (in threads, tests/fake_tp.py computing) whose meters say 30 and 90, a root at 60:
    the weighted plan's FFN rows and KV heads follow 2 : 1 : 3, the engine keeps those weights, and the
    answers are still the whole model's."""
    from functools import partial

    import fake_tp
    from test_cluster import T, DaemonThread, generate

    from dllp2p.session.progress import ignore
    from dllp2p.session.root import ClusterOptions, start

    a, b = DaemonThread(tmp_path / "a"), DaemonThread(tmp_path / "b")
    try:
        a.daemon.worker.meter.add_rate(30.0)
        b.daemon.worker.meter.add_rate(90.0)
        options = ClusterOptions((a.address, b.address), "weighted", T, key=fake_tp.TEST_KEY)
        e = trio.run(partial(start, fake_tp.model(), options, 32, 1, fake_tp, ignore, node_id="root", rate=60.0))
        try:
            rows = {n.node_id: (n.ffn_rows[1] - n.ffn_rows[0], n.kv_heads[1] - n.kv_heads[0]) for n in e.plan.nodes}
            assert rows == {"root": (96, 1), a.daemon.node_id: (32, 1), b.daemon.node_id: (128, 2)}
            assert e.rates == {"root": 60.0, a.daemon.node_id: 30.0, b.daemon.node_id: 90.0}
            generate(e, fake_tp.model())
        finally:
            e.close()
    finally:
        a.stop()
        b.stop()


def test_a_daemon_without_configured_threads_chooses_them_per_session(tmp_path, monkeypatch):
    """threads_auto (no --threads, no config threads): each session's engine gets the count chosen as it
    starts (the load then, not only the daemon's start's); a configured count stays as it is."""
    from functools import partial
    from types import SimpleNamespace

    import fake_tp
    from test_cluster import T

    from dllp2p.daemon import Daemon, DaemonConfig
    from dllp2p.jit import engine as jit_engine
    from dllp2p.jit.cpus import ThreadChoice
    from dllp2p.session.progress import ignore
    from dllp2p.session.root import ClusterOptions, start

    built: list[int] = []

    class TPNode(fake_tp.TPNode):
        def __init__(self, *args, **kwargs):
            built.append(args[6])  # threads
            super().__init__(*args, **kwargs)

    tp = SimpleNamespace(**{k: getattr(fake_tp, k) for k in dir(fake_tp) if not k.startswith("__")})
    tp.TPNode = tp.plan_node = TPNode
    counts = iter([1, 3])
    monkeypatch.setattr(jit_engine, "default_thread_choice", lambda: ThreadChoice(next(counts), "made up"))

    async def main() -> None:
        auto = Daemon(DaemonConfig("127.0.0.1", 0, 2, tmp_path / "a", timeouts=T, cluster=fake_tp.TEST_CLUSTER,
                                   key=fake_tp.TEST_KEY, threads_auto=True), tp=tp)
        fixed = Daemon(DaemonConfig("127.0.0.1", 0, 2, tmp_path / "b", timeouts=T, cluster=fake_tp.TEST_CLUSTER,
                                    key=fake_tp.TEST_KEY), tp=tp)
        async with trio.open_nursery() as nursery:
            addresses = [await nursery.start(d.serve) for d in (auto, fixed)]
            for _ in range(2):
                options = ClusterOptions(tuple(addresses), "weighted", T, key=fake_tp.TEST_KEY)
                e = await start(fake_tp.model(), options, 32, 5, tp, ignore, node_id="root")
                await trio.to_thread.run_sync(partial(e.forward, [5], 0))
                await trio.to_thread.run_sync(e.close)
            nursery.cancel_scope.cancel()

    trio.run(main)
    # per session, in any order: the root's 5, the auto worker's chosen count (1, then 3), the fixed one's 2
    assert sorted(built[:3]) == [1, 2, 5] and sorted(built[3:]) == [2, 3, 5]


def test_a_plan_made_again_keeps_its_weights_while_the_rates_move_within_noise():
    """steady_rates: the next plan over the same (or fewer) nodes gets the last plan's weights back unless a
    share moved by more than the tolerance, so it cuts the same slices (cached on the workers, compiled);
    a node without a previous weight, or one that really slowed down, gets the new rates."""
    from dllp2p.scheduler import steady_rates

    last = {"root": 60.0, "a": 30.0, "b": 90.0}
    assert steady_rates(last, {"root": 63.0, "a": 28.0, "b": 95.0}) == last
    assert steady_rates(last, {"root": 61.0, "b": 88.0}) == {"root": 60.0, "b": 90.0}  # "a" lost: the rest as before
    slower = {"root": 60.0, "a": 10.0, "b": 90.0}
    assert steady_rates(last, slower) == slower
    fresh = {"root": 60.0, "c": 40.0}
    assert steady_rates(last, fresh) == fresh
    assert steady_rates({}, fresh) == fresh
