"""Busy nodes left out of the plan (issue 19): a node whose CPU another program holds stalls every exchange
of a token, whatever its share, so the cost model prices its CPU wait per exchange (costmodel.DeviceFigures
.wait_ms), the planner leaves it out when the plan without it is predicted faster (planner.busy_out), and
the root (session/busy.py) tries it again later, with hysteresis. Fake facts and fake clocks throughout:
nothing here is timed."""

from __future__ import annotations

import pytest
import trio

from dllp2p.config import Timeouts
from dllp2p.costmodel import Candidate, DeviceFigures, LinkFigures, ModelShape, group_exchange, messages, predict
from dllp2p.formats import ModelConfig
from dllp2p.planner import BACK_MARGIN, OUT_MARGIN, busy_out
from dllp2p.scheduler import Peer, plan
from dllp2p.session.busy import BusyNodes, Polled
from dllp2p.session.rates import RateMeter, plan_exchanges
from dllp2p.session.service import RootService
from dllp2p.wire import codec
from dllp2p.wire import messages as P

SMOLLM2 = ModelConfig(arch="llama", dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=1536,
                      vocab_size=49152, context_length=8192, rope_base=100000.0, rope_dim=64, norm_eps=1e-5,
                      tied_output=True)
# SmolLM2's bytes per token (Q4_1 layers, Q8_0 output): ~96.6 MB
SHAPE = ModelShape(576, 1536, 30, 576, 192, 49152, 2.21e6, 30.1e6, max_nodes=3)
RATE = 170.0  # whole-model tok/s of one quiet node (replan_bench's daemons, 1 thread each)
GBPS = RATE * SHAPE.weight_bytes / 1e9
ALONE_MS = 1e3 / RATE  # the root alone: ~5.9 ms a token
LINKS = [LinkFigures(0.0, 117.0), LinkFigures(0.2, 117.0), LinkFigures(0.2, 117.0)]


def _devices(*waits: float) -> list[DeviceFigures]:
    return [DeviceFigures(GBPS, wait_ms=w) for w in waits]


# --- the cost model ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("exchange", ["exact", "q8", "star"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_messages_are_the_exchanges_the_cost_model_counts(exchange, k):
    assert messages(exchange, k, 30) == group_exchange(SHAPE, exchange, k, 30, True)[0]


def test_a_nodes_cpu_wait_is_latency_at_every_exchange_of_a_plan_that_includes_it():
    two = Candidate("tp", ((0, 1),), (30,))
    quiet = predict(SHAPE, _devices(0.0, 0.0), LINKS[:2], two)
    busy = predict(SHAPE, _devices(0.0, 0.03), LINKS[:2], two)
    assert busy.compute_ms == quiet.compute_ms and busy.transfer_ms == quiet.transfer_ms
    assert busy.latency_ms - quiet.latency_ms == pytest.approx(121 * 0.03)  # 4 x 30 exchanges + the logits'
    assert any("CPU wait 3.63 ms a token" in n for n in busy.notes)
    # an exchange waits for the group's busiest node, not for the sum of their waits
    both = predict(SHAPE, _devices(0.01, 0.03), LINKS[:2], two)
    assert both.latency_ms == pytest.approx(busy.latency_ms)
    # alone, the root exchanges nothing: a node that is not in the plan costs nothing
    alone = Candidate("tp", ((0,),), (30,))
    busy_alone, quiet_alone = (predict(SHAPE, _devices(0.0, w), LINKS[:2], alone) for w in (0.03, 0.0))
    assert busy_alone.total_ms == quiet_alone.total_ms
    with pytest.raises(ValueError):
        DeviceFigures(1.0, wait_ms=-1.0)


# --- the planner: who is left out ----------------------------------------------------------------------------


@pytest.mark.parametrize("waits, out, left", [
    ((0.0, 0.0), (), {}),  # quiet: kept, although the cost model prices 2 nodes slower than 1 on these links
    ((0.0, 0.002), (), {}),  # a little wait: within the margin
    ((0.0, 0.035), (), {1: 121 * 0.035}),  # a hog on its core (replan_bench: ~4 ms a token): left out
    ((0.05, 0.0), (), {1: 121 * 0.05}),  # a busy root: alone it waits at no exchange
    ((0.0, 0.007), (), {}),  # between the margins: a node in stays in ...
    ((0.0, 0.007), (1,), {1: 121 * 0.007}),  # ... and a node out stays out (hysteresis)
    ((0.0, 0.001), (1,), {}),  # its wait fell below the back margin: taken back
])
def test_busy_out_two_nodes(waits, out, left):
    got = busy_out(SHAPE, _devices(*waits), LINKS[:2], out=out)
    assert got.keys() == left.keys()
    assert all(got[i] == pytest.approx(left[i]) for i in left)


def test_the_margins_are_of_the_plan_without_the_node():
    """Between OUT_MARGIN and BACK_MARGIN of the root alone's time, priced per token: exactly the band."""
    per_exchange = lambda f: f * ALONE_MS / 121  # noqa: E731
    assert not busy_out(SHAPE, _devices(0.0, per_exchange(OUT_MARGIN * 0.95)), LINKS[:2])
    assert busy_out(SHAPE, _devices(0.0, per_exchange(OUT_MARGIN * 1.05)), LINKS[:2])
    assert busy_out(SHAPE, _devices(0.0, per_exchange(BACK_MARGIN * 1.05)), LINKS[:2], out={1})
    assert not busy_out(SHAPE, _devices(0.0, per_exchange(BACK_MARGIN * 0.95)), LINKS[:2], out={1})


def test_busy_out_three_nodes():
    # one busy of three: only it leaves; the other two keep the work
    assert busy_out(SHAPE, _devices(0.0, 0.0, 0.04), LINKS).keys() == {2}
    # two busy: an exchange waits for the busiest, so they leave together
    assert busy_out(SHAPE, _devices(0.0, 0.03, 0.04), LINKS).keys() == {1, 2}
    # however slow the links are priced (here: 2 nodes slower than 1 by far), a quiet node is never left out
    # with a busy one: leaving it too cures no more wait
    slow_links = [LinkFigures(0.0, 117.0), LinkFigures(5.0, 117.0), LinkFigures(5.0, 117.0)]
    for wait in (0.01, 0.035, 0.2, 2.0):
        assert busy_out(SHAPE, _devices(0.0, 0.0, wait), slow_links).keys() <= {2}
    assert busy_out(SHAPE, _devices(0.0, 0.0, 2.0), slow_links).keys() == {2}  # 20 % of a 305 ms token: 61 ms
    # a busy root: leaving one quiet worker out would not cure its wait at every exchange; both go
    left = busy_out(SHAPE, _devices(0.04, 0.0, 0.0), LINKS)
    assert left == pytest.approx({1: 121 * 0.04, 2: 121 * 0.04})
    # on a fast LAN where a third node pays (low latency, slow nodes), a small wait is worth its share
    fast = [LinkFigures(0.0, 1e4), LinkFigures(0.01, 1e4), LinkFigures(0.01, 1e4)]
    slow = [DeviceFigures(1.0), DeviceFigures(1.0), DeviceFigures(1.0, wait_ms=0.05)]
    assert busy_out(SHAPE, slow, fast) == {}
    assert busy_out(SHAPE, [*slow[:2], DeviceFigures(1.0, wait_ms=2.0)], fast).keys() == {2}


# --- measuring the wait ----------------------------------------------------------------------------------------


def test_meter_keeps_the_wait_per_exchange_of_decode_steps():
    m = RateMeter(window=3)
    assert m.wait_ms == 0.0
    m.add_step(0.5, 10.0, 32, 5.0, 121)  # a prefill chunk: not counted
    m.add_step(0.5, 10.0, 1, 1.21, 0)  # alone: no exchanges to wait at
    assert m.wait_ms == 0.0 and m.rate == pytest.approx(50.0)
    for wait in (1.21, 12.1, 2.42, 3.63):
        m.add_step(0.5, 10.0 + wait, 1, wait, 121)
    assert m.wait_ms == pytest.approx(0.03)  # the median of the last 3: 0.1, 0.02, 0.03
    two = plan(SMOLLM2, [Peer("r", "", 1, 1.0), Peer("w", "127.0.0.1:1", 1, 1.0)], 1, "weighted")
    assert plan_exchanges(two, 0, 30) == plan_exchanges(two, 1, 30) == 121
    assert plan_exchanges(plan(SMOLLM2, [Peer("r", "", 1, 1.0)], 1), 0, 30) == 0


def test_waits_on_the_wire():
    hello = P.Hello(P.PROTOCOL_VERSION, "w", "worker", 2, 2.0, rate=61.5, wait_ms=0.035)
    assert codec.decode_body(codec.MsgType.HELLO, codec.encode(hello)[codec.HEADER.size:]) == hello
    body = codec._to_wire(P.Hello(P.PROTOCOL_VERSION, "w", "worker", 2, 2.0), P.Hello, "Hello")
    del body["wait_ms"]  # a sender that does not measure it
    assert codec.decode_body(codec.MsgType.HELLO, codec.msgpack.packb(body, use_bin_type=True)).wait_ms == 0.0
    with pytest.raises(ValueError):
        P.Hello(P.PROTOCOL_VERSION, "w", "worker", 2, 2.0, wait_ms=-0.1)


# --- the root's record: left out, tried again, taken back -------------------------------------------------------


def _root(wait: float = 0.0) -> Polled:
    return Polled("r", "", RATE, wait)


def test_busy_node_left_out_tried_again_and_taken_back():
    busy = BusyNodes(base_s=30.0, max_s=100.0, trial_s=5.0)
    w = lambda wait: Polled("w", "127.0.0.1:9001", RATE * 0.6, wait)  # noqa: E731

    def judge(wait: float, now: float) -> list:
        return busy.judge(SHAPE, "exact", _root(), [w(wait)], now=now)

    assert judge(0.0, now=0.0) == []
    [left] = judge(0.03, now=10.0)
    assert (left.node_id, left.address, left.until) == ("w", "127.0.0.1:9001", 40.0)
    assert left.reason == "CPU wait 3.6 ms per token"
    assert judge(0.03, now=39.0) == [left]
    # its time is up: planned again, and not judged for trial_s (its wait, and the root's, are from before)
    assert judge(0.03, now=41.0) == [] and judge(0.03, now=45.0) == []
    # measured afresh in that plan, still busy: out for twice as long, then at most max_s
    assert [x.until for x in judge(0.031, now=46.0)] == [106.0]
    assert judge(0.031, now=107.0) == []
    assert [x.until for x in judge(0.04, now=113.0)] == [213.0]
    # between the margins after a try: out again (a node out comes back only below BACK_MARGIN)
    assert judge(0.04, now=214.0) == []
    assert [x.until for x in judge(0.007, now=220.0)] == [320.0]
    # tried again and quiet now: taken back, and it stays in through noise below the out margin
    assert judge(0.007, now=321.0) == []
    assert judge(0.001, now=327.0) == []
    assert judge(0.007, now=328.0) == []
    # busy again: left out for the base time again
    assert [x.until for x in judge(0.03, now=329.0)] == [359.0]


def test_nothing_is_judged_without_every_nodes_rate():
    busy = BusyNodes()
    assert busy.judge(SHAPE, "exact", Polled("r", "", 0.0, 0.0), [Polled("w", "a:1", RATE, 1.0)], now=0.0) == []
    assert busy.judge(SHAPE, "exact", _root(), [Polled("w", "a:1", 0.0, 1.0)], now=0.0) == []


def test_root_service_plans_without_a_busy_worker_and_status_says_why():
    """The daemon's side: its RootService, polled facts injected as the Status polls would bring them,
    leaves the busy worker out (left_out_now: what Status and `dllp2p status` show) only when asked to."""
    from types import SimpleNamespace

    from dllp2p.commands.status import _left_why

    polled = [Polled("quiet", "127.0.0.1:9001", RATE, 0.0), Polled("busy", "127.0.0.1:9002", RATE / 2, 0.05)]
    model = SimpleNamespace(config=SMOLLM2)  # a stand-in: its shape at one byte a weight
    meter = RateMeter()
    meter.add_rate(RATE)
    workers = [p.address for p in polled]
    service = RootService(None, "r", 1, "weighted", Timeouts(), lambda: None, meter=meter, polled=lambda: polled,
                          drop_busy=True)
    service._judge_busy(model, workers)
    [left] = service.left_out_now()
    assert (left.node_id, left.address, left.code) == ("busy", "127.0.0.1:9002", "cpu_wait")
    assert left.reason.startswith("CPU wait ") and left.reason.endswith(" ms per token")
    assert _left_why({"code": left.code, "reason": left.reason}) == left.reason
    assert _left_why({"code": "disk_full", "reason": "no space"}) == "disk full"
    keep = RootService(None, "r", 1, "weighted", Timeouts(), lambda: None, meter=meter, polled=lambda: polled)
    keep._judge_busy(model, workers)
    assert keep.left_out_now() == []
    trio.run(service.close_warm)


def test_a_root_daemon_leaves_out_the_worker_whose_status_says_it_is_busy(tmp_path):
    """The daemon path: two worker daemons (tests/fake_tp.py) whose meters were fed decode steps, one quiet
    and one waiting 6 ms for its CPU at each exchange (far more than its share saves, however slow the
    loaded test machine makes the polls' round trips that price the exchanges' latency); the root daemon's
    Status polls bring their rates and waits (StatusReply.wait_ms -> Membership.waits), and its RootService,
    asked to (drop_busy), plans without the busy one and says so in its own Status (left_out: code cpu_wait,
    the wait per token)."""
    import time

    import fake_tp
    from test_cluster import T, DaemonThread

    from dllp2p.daemon import Daemon, DaemonConfig
    from dllp2p.discovery import StaticOptions
    from dllp2p.wire.client import ask_status

    quiet, busy = DaemonThread(tmp_path / "quiet"), DaemonThread(tmp_path / "busy")
    try:
        quiet.daemon.worker.meter.add_step(0.5, 6.0, 1, 0.0, 9)  # half the model in 6 ms, no wait
        busy.daemon.worker.meter.add_step(0.5, 60.0, 1, 54.0, 9)  # ... in 60 ms, of which 54 waiting for a CPU

        async def main() -> None:
            root = Daemon(DaemonConfig("127.0.0.1", 0, 1, tmp_path / "root", timeouts=T, cluster=fake_tp.TEST_CLUSTER,
                                       key=fake_tp.TEST_KEY, peers=(quiet.address, busy.address), policy="weighted",
                                       static=StaticOptions(interval=0.2), drop_busy=True), tp=fake_tp)
            async with trio.open_nursery() as nursery:
                address = await nursery.start(root.serve)
                deadline = time.monotonic() + 20
                while len([p for p in root._polled() if p.rate > 0]) < 2:
                    assert time.monotonic() < deadline, root._polled()
                    await trio.sleep(0.1)
                assert {p.address: p.wait_ms for p in root._polled()} == pytest.approx(
                    {quiet.address: 0.0, busy.address: 54.0 / 9})
                root.root_service.meter.add_step(0.5, 6.0, 1, 0.0, 9)  # the root's own rate: quiet
                root.root_service._judge_busy(fake_tp.model(), [quiet.address, busy.address])
                reply = await ask_status(address, 5.0, 0, fake_tp.TEST_KEY)
                assert len(reply.left_out) == 1, (reply.left_out, root._polled())
                [left] = reply.left_out
                assert (left.node_id, left.address, left.code) == (busy.daemon.node_id, busy.address, "cpu_wait")
                assert left.reason == "CPU wait 54.0 ms per token" and left.until > time.time() + 20
                nursery.cancel_scope.cancel()

        trio.run(main)
    finally:
        quiet.stop()
        busy.stop()
