"""Many requests at once on one root (issue 18): the batcher's pure core (admission, FIFO queue, refusal,
the chunk budget, the KV budget, prefix sharing) and its driver (batching.BatchService) over SoloBatch of
a toy engine whose logits are a hash of everything its KV holds, so any mix-up of slots, positions or
shared prefixes changes the text. Each stream's greedy text equals its solo run through generate()."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import trio

from dllp2p.engine import BatchRow, ContextFull, SoloBatch
from dllp2p.error_codes import CodedError, ErrorCode
from dllp2p.formats import load_model
from dllp2p.formats.synthetic import SyntheticSpec, write_random_llama
from dllp2p.generate import StopFilter, generate
from dllp2p.sampler import Sampler, SamplerConfig
from dllp2p.session.batcher import BatchConfig, BatchCore, QueueFull, Seq
from dllp2p.session.batching import BatchService
from dllp2p.tokenizer import StreamDecoder, Tokenizer
from dllp2p.wire.link import LinkClosed
from dllp2p.wire.messages import Done, Error, Generate, TokenChunk

VOCAB = 320


class HashEngine:
    """An Engine whose logits f32[vocab] are a fixed function of the ids its KV cache holds (all of them)."""

    def __init__(self, config, ctx: int):
        self.config, self.ctx = config, ctx
        self.held: list[int] = []

    def forward(self, tokens, start_pos: int) -> np.ndarray:
        if start_pos > len(self.held):
            raise ValueError(f"start_pos {start_pos} beyond {len(self.held)}")
        if start_pos + len(tokens) > self.ctx:
            raise ContextFull("full")
        self.held[start_pos:] = list(tokens)
        seed = zlib.crc32(np.asarray(self.held, np.int64).tobytes())
        logits = np.random.default_rng(seed).standard_normal(self.config.vocab_size).astype(np.float32)
        logits[list(self.stop_ids)] -= 2.0  # a stop now and then, not at once
        return logits

    stop_ids: tuple[int, ...] = ()

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return random_model(tmp_path_factory)


def random_model(tmp_path_factory):
    """A 1-layer random-weight model and its tokenizer (test_pipelined_batching.py's fixture too)."""
    spec = SyntheticSpec(n_layers=1, dim=64, n_heads=2, n_kv_heads=2, ffn_dim=64, vocab_size=VOCAB)
    m = load_model(write_random_llama(tmp_path_factory.mktemp("batching") / "random.gguf", spec))
    return m, Tokenizer.from_metadata(m.metadata)


def _engine(config, tok, ctx: int) -> HashEngine:
    e = HashEngine(config, ctx)
    e.stop_ids = tuple(tok.eos_ids)
    return e


def _prompt(seed: int, n: int, prefix: tuple[int, ...] = ()) -> tuple[int, ...]:
    return prefix + tuple(int(t) for t in np.random.default_rng(seed).integers(3, 259, n))


def solo_text(model, ids, steps: int, ctx: int, stop=()) -> tuple[str, str]:
    """What one engine alone generates greedily: (text, stop reason), as the root's loop makes it."""
    m, tok = model
    stats_reason = ""
    from dllp2p.generate import GenerationStats

    stats = GenerationStats()
    dec, stops = StreamDecoder(tok), StopFilter(stop)
    out = []
    for t in generate(_engine(m.config, tok, ctx), list(ids), Sampler(SamplerConfig(temperature=0)), steps,
                      tok.eos_ids, stats):
        out.append(stops.push(dec.push(t)))
        if stops.stopped:
            stats_reason = "stop"
            break
    else:
        out.append(stops.push(dec.flush()))
        out.append(stops.flush())
    return "".join(out), stats_reason or stats.stop_reason


class Sink:
    """A link: collects what the root answers; `leave_after` pieces, then it is gone (LinkClosed)."""

    def __init__(self, leave_after: int | None = None):
        self.peer, self.got, self.leave_after = "test", [], leave_after

    async def send(self, msg) -> None:
        if self.leave_after is not None and len(self.got) >= self.leave_after:
            raise LinkClosed("gone")
        self.got.append(msg)

    def text(self) -> str:
        return "".join(m.text for m in self.got if isinstance(m, TokenChunk))


def _gen(ids, steps: int, ctx: int, stop=()) -> Generate:
    return Generate("", tuple(ids), False, None, steps, ctx, 0.0, 40, 1.0, 0.05, 1.0, None, stop=tuple(stop))


def _service(model, cfg: BatchConfig, ctx: int = 128) -> tuple[BatchService, list[SoloBatch]]:
    m, tok = model
    made: list[SoloBatch] = []

    async def make(c: int) -> SoloBatch:
        made.append(SoloBatch(lambda: _engine(m.config, tok, c), cfg.max_batch))
        return made[-1]

    svc = BatchService(cfg, "root-test", clock=trio.current_time)
    svc.attach(make, tok, ctx, 64)
    return svc, made


# --- the pure core ---------------------------------------------------------------------------------------


def test_core_admits_queues_fifo_and_refuses_beyond_the_queue():
    core = BatchCore(BatchConfig(max_batch=8, queue=0), ctx=64, kv_position=1)
    seqs = [Seq(i, _prompt(i, 5), 4, 64) for i in range(9)]
    for s in seqs[:8]:
        core.submit(s)
    assert [s.state for s in seqs[:8]] == ["running"] * 8 and len({s.slot for s in seqs[:8]}) == 8
    with pytest.raises(QueueFull) as refused:
        core.submit(seqs[8])
    assert refused.value.code is ErrorCode.RATE_LIMITED and ErrorCode.RATE_LIMITED.http_status == 429
    core = BatchCore(BatchConfig(max_batch=2, queue=2), ctx=64, kv_position=1)
    seqs = [Seq(i, _prompt(i, 5), 2, 64) for i in range(5)]
    for s in seqs[:4]:
        core.submit(s)
    assert [s.state for s in seqs[:4]] == ["running", "running", "queued", "queued"]
    with pytest.raises(QueueFull):
        core.submit(seqs[4])
    core.cancel(seqs[0])  # leaves at the next plan: the first queued one (FIFO) takes its slot
    step = core.plan()
    assert seqs[2].state == "running" and seqs[3].state == "queued" and seqs[2].slot == seqs[0].slot
    assert {r.seq for r in step.rows} == {seqs[1].slot, seqs[2].slot}


def test_core_chunk_budget_keeps_decodes_going():
    """A long prompt is cut into chunk-sized rows while every running sequence decodes in every step."""
    core = BatchCore(BatchConfig(max_batch=4, chunk=16), ctx=512, kv_position=1)
    short = Seq(1, _prompt(1, 3), 100, 512)
    core.submit(short)
    step = core.plan()
    core.advance(step)
    core.push(short, 7)
    long = Seq(2, _prompt(2, 100), 4, 512)
    core.submit(long)
    steps = 0
    while not long.prefilled:
        step = core.plan()
        rows = dict(zip((s.rid for s in step.seqs), step.rows))
        assert len(rows[1].tokens) == 1 and len(rows[2].tokens) <= 16
        core.advance(step)
        core.push(short, 7)
        steps += 1
    assert steps == 7 and step.sample[-1]  # 100 = 6 x 16 + 4; the last chunk's logits give its first token


def test_core_never_exceeds_the_kv_budget():
    """Random requests against a budget of 3 sequences' worth: reservations plus cached prefixes stay within it."""
    rng = np.random.default_rng(5)
    core = BatchCore(BatchConfig(max_batch=6, queue=100, kv_budget=90 * 4, chunk=8), ctx=64, kv_position=4)
    assert core.budget == 90
    pending = [Seq(i, _prompt(i % 3, int(rng.integers(2, 20)), (5, 6, 7)), int(rng.integers(1, 12)), 64)
               for i in range(40)]
    most = 0
    for _ in range(400):
        if pending and rng.random() < 0.3:
            core.submit(pending.pop())
        step = core.plan()
        most = max(most, core.reserved())
        assert core.reserved() <= core.budget
        if step is None:
            if not pending:
                break
            continue
        core.advance(step)
        for seq, sample in zip(step.seqs, step.sample):
            if sample and seq.state == "running":
                core.push(seq, int(rng.integers(3, 200)))
    assert not pending and not core.busy() and most > 45
    with pytest.raises(CodedError) as too_big:
        core.submit(Seq(99, _prompt(0, 60), 40, 128))  # 100 positions > 90
    assert too_big.value.code is ErrorCode.CONTEXT_LENGTH


def test_core_shares_prefixes():
    """A request sharing a finished one's first tokens takes its slot over; one sharing a running one's gets
    them by copy; at least the prompt's last token is always computed."""
    core = BatchCore(BatchConfig(max_batch=3), ctx=64, kv_position=1)
    system = _prompt(9, 10)
    a = Seq(1, system + (50, 51), 1, 64)
    core.submit(a)
    core.advance(core.plan())
    core.push(a, 60)  # its one step: done
    b = Seq(2, system + (50, 51, 60, 70), 3, 64)  # a's whole conversation and more
    core.submit(b)
    step = core.plan()
    assert b.slot == a.slot and b.cached == 12 and not step.copies  # a's KV holds its 12 prompt tokens
    assert step.rows == (BatchRow(b.slot, (60, 70), 12),)
    core.advance(step)
    c = Seq(3, system + (99,), 2, 64)
    core.submit(c)
    step = core.plan()
    assert c.cached == 10 and step.copies[0].src == b.slot and step.copies[0].n == 10 and c.slot != b.slot
    same = Seq(4, system + (50, 51), 2, 64)  # equal to a's prompt: its last token is computed again
    core.submit(same)
    assert same.cached == 11


# --- the driver over an engine --------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 4, 8])
def test_concurrent_greedy_streams_equal_their_solo_runs(model, n):
    """n requests of different lengths joining at different times (some sharing a system prompt, one with a
    stop string); each stream's text and stop reason are its solo run's."""
    system = _prompt(77, 12)
    reqs = [(_prompt(i, 3 + 5 * i, system if i % 2 else ()), 4 + 3 * i, 96, ("q",) if i == 3 else ())
            for i in range(n)]
    svc, made = _service(model, BatchConfig(max_batch=8, chunk=12), ctx=96)
    sinks = [Sink() for _ in reqs]
    sizes = []

    finished, started = [], {}

    async def main():
        async with trio.open_nursery() as nursery:
            async def one(i):
                while i and (i - 1 not in started or (svc.steps < started[i - 1] + 2 and svc.busy())):
                    await trio.sleep(0.001)  # joining 2 steps after the one before, while the others run
                started[i] = svc.steps
                ids, steps, ctx, stop = reqs[i]
                await svc.generate(sinks[i], _gen(ids, steps, ctx, stop), list(ids))
                finished.append(i)

            async def driver():
                while len(finished) < n:
                    if svc.busy() and await svc.step():
                        sizes.append(svc.core.last_batch)
                    await trio.sleep(0.001)

            nursery.start_soon(driver)
            for i in range(n):
                nursery.start_soon(one, i)

    trio.run(main)
    for (ids, steps, ctx, stop), sink in zip(reqs, sinks):
        done = sink.got[-1]
        assert isinstance(done, Done), sink.got[-1]
        assert (sink.text(), done.stop_reason) == solo_text(model, ids, steps, ctx, stop)
        assert done.prompt_tokens == len(ids) and done.generated_tokens >= 1
    assert max(sizes) > 1 and len(made) == 1  # really batched, on one engine
    if n >= 4:
        shared = [s.got[-1] for s in sinks if s.got[-1].cached_tokens >= 12]
        assert shared and any(line.startswith(f"{shared[0].cached_tokens} of the ") for line in shared[0].stats)


def test_a_client_that_leaves_is_gone_within_one_step(model):
    """Its link's send fails after 2 pieces: no step planned after that computes its sequence again."""
    svc, _ = _service(model, BatchConfig(max_batch=4))
    stay, leave = Sink(), Sink(leave_after=2)
    seqs = []
    submit = svc.core.submit
    svc.core.submit = lambda seq: (seqs.append(seq), submit(seq))[1]
    held = []  # after each step: what the leaving sequence's slot holds
    gone_at = []  # steps run when its send failed

    async def send(msg):
        if len(leave.got) >= 2 and not gone_at:
            gone_at.append(svc.steps)
        await Sink.send(leave, msg)

    leave.send = send

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(svc.generate, stay, _gen(_prompt(1, 4), 30, 64), list(_prompt(1, 4)))
            nursery.start_soon(svc.generate, leave, _gen(_prompt(2, 4), 30, 64), list(_prompt(2, 4)))
            await trio.sleep(0.01)
            while svc.busy():
                await svc.step()
                held.append(next(s.held for s in seqs if s.prompt == _prompt(2, 4)))
                await trio.sleep(0.001)  # the streams' tasks send what the step made

    trio.run(main)
    gone = next(s for s in seqs if s.prompt == _prompt(2, 4))  # (trio starts the two tasks in either order)
    assert gone_at and gone.state == "gone" and gone not in svc.core.running
    assert len(set(held[gone_at[0]:])) == 1 and len(held) > gone_at[0] + 5  # frozen from the next step on
    assert isinstance(stay.got[-1], Done) and stay.got[-1].generated_tokens == 30


def test_refused_beyond_the_queue_and_failed_engines_answer_errors(model):
    svc, _ = _service(model, BatchConfig(max_batch=1, queue=0))
    first, second = Sink(), Sink()

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(svc.generate, first, _gen(_prompt(1, 4), 3, 64), list(_prompt(1, 4)))
            await trio.sleep(0.01)
            await svc.generate(second, _gen(_prompt(2, 4), 3, 64), list(_prompt(2, 4)))
            while svc.busy():
                await svc.step()
                await trio.sleep(0.001)

    trio.run(main)
    assert isinstance(first.got[-1], Done)
    assert isinstance(second.got[-1], Error) and second.got[-1].kind is ErrorCode.RATE_LIMITED


def test_status_shows_running_and_queued_requests():
    """The root's ServingStatus travels in StatusReply (an older reply without it decodes as None) and shows
    in `status --json` and the live view's caption."""
    from rich.console import Console

    from dllp2p import wire as P
    from dllp2p.commands import status

    svc = BatchService(BatchConfig(max_batch=2, queue=4), "root-test")
    svc.attach(lambda ctx: None, None, 64, 1)
    for i in range(3):
        svc.core.submit(Seq(i, _prompt(i, 5), 4, 64))
    sv = svc.serving()
    assert (sv.running, sv.queued, sv.max_batch, sv.queue, sv.kv_reserved, sv.kv_budget) == (2, 1, 2, 4, 18, 128)
    reply = P.StatusReply(1, "root-test", (), None, None, 0, serving=sv)
    (back,) = P.FrameDecoder().feed(P.encode(reply))
    assert back == reply
    old = P.FrameDecoder().feed(P.encode(P.StatusReply(1, "root-test", (), None, None, 0)))[0]
    assert old.serving is None
    j = status.to_json(status.Survey("127.0.0.1:1", back))
    assert j["serving"]["running"] == 2 and j["serving"]["queued"] == 1 and j["serving"]["max_batch"] == 2
    console = Console(width=200, record=True)
    console.print(status.table(status.Survey("127.0.0.1:1", back)))
    assert "requests: 2 running, 1 queued (batch 0 of 2" in console.export_text()


def test_status_shows_the_tokens_a_second_of_the_latest_steps_and_the_requests_served(model):
    """serving(): tok_s counts the tokens sampled over the steps of the last RATE_WINDOW_S seconds (2 streams, a
    step every 10 ms: 200 tok/s), 0 once no step ran for that long; `served` the requests answered. The live
    view's caption shows both."""
    from rich.console import Console

    from dllp2p import wire as P
    from dllp2p.commands import status
    from dllp2p.session.batching import RATE_WINDOW_S

    now = [100.0]
    m, tok = model

    async def make(c: int) -> SoloBatch:
        return SoloBatch(lambda: _engine(m.config, tok, c), 2)

    svc = BatchService(BatchConfig(max_batch=2, chunk=16), "root-test", clock=lambda: now[0])
    svc.attach(make, tok, 64, 64)
    sinks, seen = [Sink(), Sink()], []

    async def main():
        async with trio.open_nursery() as nursery:
            for i, sink in enumerate(sinks):
                nursery.start_soon(svc.generate, sink, _gen(_prompt(60 + i, 4), 12, 64), list(_prompt(60 + i, 4)))
            await trio.sleep(0.01)
            while svc.busy():
                await svc.step()
                now[0] += 0.01
                seen.append(svc.serving())
                await trio.sleep(0.001)

    trio.run(main)
    both = [sv for sv in seen if sv.running == 2 and sv.tok_s]
    assert both and all(sv.tok_s == pytest.approx(200) for sv in both[1:]), [sv.tok_s for sv in seen]
    assert svc.served == 2 and svc.serving().served == 2
    now[0] += RATE_WINDOW_S + 0.1
    assert svc.serving().tok_s == 0
    busy = both[-1]
    reply = P.StatusReply(1, "root-test", (), None, None, 0, serving=busy)
    (back,) = P.FrameDecoder().feed(P.encode(reply))
    assert back == reply
    console = Console(width=240, record=True)
    console.print(status.table(status.Survey("127.0.0.1:1", back)))
    text = " ".join(console.export_text().split())  # (the caption wraps at the table's width)
    assert "requests: 2 running, 0 queued (batch 2 of 2, KV 25%), 200 tok/s" in text, text


def test_bench_concurrency_runs_streams_together_as_alone(model):
    """`dllp2p bench --concurrency`'s run: N streams in one batch each decode what they decode alone."""
    from dllp2p.bench_concurrency import decode_run

    m, tok = model
    batch = SoloBatch(lambda: _engine(m.config, tok, 64), 3)
    batch.max_seqs, batch.kv_bytes_per_position = 3, 64
    ps = [_prompt(i, 6 + i) for i in range(3)]
    seconds, together = decode_run(batch, ps, 5, 64)
    for p, got in zip(ps, together):
        _, alone = decode_run(SoloBatch(lambda: _engine(m.config, tok, 64), 1), [p], 5, 64)
        assert got == alone[0] and len(got) == 5
    assert seconds > 0


def test_a_resumed_request_goes_on_where_the_lost_root_stopped(model):
    """already (a resumption: tokens the client has from a root that was lost): prefilled after the prompt,
    their text not sent again; what follows is the rest of the solo run's text."""
    m, tok = model
    ids, steps = _prompt(3, 6), 12
    whole, _ = solo_text(model, ids, steps, 64)
    tokens = list(generate(_engine(m.config, tok, 64), list(ids), Sampler(SamplerConfig(temperature=0)), steps,
                           tok.eos_ids))
    assert len(tokens) > 5
    dec = StreamDecoder(tok)
    sent = "".join(dec.push(t) for t in tokens[:5])  # what the lost root had sent for its 5 tokens
    svc, _ = _service(model, BatchConfig(max_batch=2), ctx=64)
    sink = Sink()

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: svc.generate(sink, _gen(ids, steps, 64), list(ids), already=tuple(tokens[:5])))
            await trio.sleep(0.01)
            while svc.busy():
                await svc.step()
                await trio.sleep(0.001)

    trio.run(main)
    done = sink.got[-1]
    assert sent + sink.text() == whole and done.generated_tokens == len(tokens) and done.prompt_tokens == len(ids)
    assert any(line.startswith("resumed after 5 tokens") for line in done.stats)


def test_a_stop_string_completed_by_the_last_token_says_stop(model):
    """The stop reason of a stream whose stop string ends on its last allowed token is "stop", as solo."""
    m, tok = model
    for seed in range(100):  # a prompt whose 6th token ends with a character not shown before it
        ids = _prompt(seed, 5)
        tokens = list(generate(_engine(m.config, tok, 64), list(ids), Sampler(SamplerConfig(temperature=0)), 6,
                               tok.eos_ids))
        dec = StreamDecoder(tok)
        texts = [dec.push(t) for t in tokens]
        if len(tokens) == 6 and texts[-1] and texts[-1][-1] not in "".join(texts[:-1]) + texts[-1][:-1]:
            break
    else:
        pytest.fail("no prompt of 100 fits")
    stop = (texts[-1][-1],)
    svc, _ = _service(model, BatchConfig(max_batch=2), ctx=64)
    sink = Sink()

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(svc.generate, sink, _gen(ids, 6, 64, stop), list(ids))
            await trio.sleep(0.01)
            while svc.busy():
                await svc.step()
                await trio.sleep(0.001)

    trio.run(main)
    assert (sink.text(), sink.got[-1].stop_reason) == solo_text(model, ids, 6, 64, stop) == ("".join(texts)[:-1], "stop")


def test_short_decode_steps_of_an_inline_engine_run_on_the_loop(model):
    """An engine with inline_rows (a local JIT engine's: dllp2p/jit/engine.py) has its decode steps of at most that
    many rows run on the serving loop's thread, prompt chunks and bigger steps in a worker thread; the streams'
    texts are the same either way (their solo runs')."""
    reqs = [(_prompt(40 + i, 5 + 3 * i), 6 + i, 64) for i in range(3)]
    svc, _ = _service(model, BatchConfig(max_batch=4, chunk=8), ctx=64)
    where: list[tuple[int, bool, bool]] = []  # (rows, one token each, on the loop's thread)
    sinks = [Sink() for _ in reqs]

    async def clients():
        async with trio.open_nursery() as nursery:
            for (ids, steps, ctx), sink in zip(reqs, sinks):
                nursery.start_soon(svc.generate, sink, _gen(ids, steps, ctx), list(ids))

    _serve_traced(svc, 2, lambda rows, on_loop: where.append((len(rows), all(len(r.tokens) == 1 for r in rows), on_loop)),
                  clients)
    for (ids, steps, ctx), sink in zip(reqs, sinks):
        assert sink.text() == solo_text(model, ids, steps, ctx)[0]
    assert all(on_loop == (rows <= 2 and decode) for rows, decode, on_loop in where), where
    assert any(on_loop for *_, on_loop in where) and not all(on_loop for *_, on_loop in where)


def test_inline_steps_go_to_a_thread_after_a_streak_of_slow_ones_and_come_back(model, monkeypatch):
    """A slow inline step alone (a hiccup) changes nothing; INLINE_STREAK (3) in a row over INLINE_MAX_S (a slow
    device, a big model, a busy machine) send that engine's decode steps to a thread; 3 fast ones there (under half
    the limit) bring them back to the loop. The text is the solo run's throughout."""
    import time

    from dllp2p.session import inline

    monkeypatch.setattr(inline, "INLINE_MAX_S", 0.02)
    assert inline.INLINE_STREAK == 3
    svc, _ = _service(model, BatchConfig(max_batch=2, chunk=8), ctx=64)
    on_loop: list[bool] = []
    sink = Sink()

    def trace(rows, here: bool) -> None:
        on_loop.append(here)
        if here and sum(on_loop) in (2, 4, 5, 6):  # the 2nd inline step alone, then the 4th to 6th
            time.sleep(0.03)

    async def client():
        await svc.generate(sink, _gen(_prompt(7, 4), 16, 64), list(_prompt(7, 4)))

    _serve_traced(svc, 2, trace, client)
    assert sink.text() == solo_text(model, _prompt(7, 4), 16, 64)[0]
    assert on_loop[:10] == [False] + [True] * 6 + [False] * 3 and all(on_loop[10:]) and len(on_loop) >= 12, on_loop


def _serve_traced(svc: BatchService, inline_rows: int, trace, clients) -> None:
    """Run svc (its engine made once, with inline_rows) until `await clients()` returns; before each step the
    engine calls trace(rows, whether it runs on the serving loop's thread)."""
    import threading

    async def main():
        loop_thread = threading.get_ident()
        engine = await svc._make(64)
        engine.inline_rows = inline_rows
        forward = engine.forward_batch

        def traced(rows):
            trace(rows, threading.get_ident() == loop_thread)
            return forward(rows)

        engine.forward_batch = traced

        async def made(ctx: int):
            return engine

        svc._make = made
        async with trio.open_nursery() as nursery:
            nursery.start_soon(svc.run)
            await clients()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_batched_decode_steps_of_one_row_feed_the_rate_meter_and_the_cluster_figures_do_not_pile_up():
    """rates.batched_step: a one-row decode step feeds the node's rate meter as the prompt slot's steps do (a cluster
    engine's per-step figures, with the plan's share; a local engine's step time); steps of several rows or tokens
    do not. A cluster engine's figures are taken every step, so a batcher's long-lived engine holds none."""
    from types import SimpleNamespace

    from dllp2p.engine import BatchRow
    from dllp2p.formats.synthetic import SyntheticSpec
    from dllp2p.pipeline import build_plan
    from dllp2p.scheduler import Peer
    from dllp2p.session.cluster_stats import StepStats
    from dllp2p.session.rates import RateMeter, batched_step

    config = load_model_config(SyntheticSpec(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=VOCAB))
    plan = build_plan(config, [Peer("a", "", 1, 1.0), Peer("b", "", 1, 1.0)], 1, "pow2")
    one, two = (BatchRow(0, (5,), 3),), (BatchRow(0, (5,), 3), BatchRow(1, (6,), 4))
    cluster = SimpleNamespace(stats=SimpleNamespace(steps=[]))
    meter = RateMeter()
    cluster.stats.steps.append(StepStats(1, 4.0, 1.5, 0, 0, 0.5))
    batched_step(meter, cluster, one, 0.004, plan, config.n_layers)
    assert meter.rate == pytest.approx(0.5 / 3e-3) and cluster.stats.steps == []  # share 1/2 over 2.5 + 0.5 ms
    for _ in range(1000):
        cluster.stats.steps.append(StepStats(2, 6.0, 1.0, 0, 0))
        batched_step(meter, cluster, two, 0.006, plan, config.n_layers)
    assert cluster.stats.steps == [] and meter.rate == pytest.approx(0.5 / 3e-3)  # 2 rows: not a decode rate
    local = SimpleNamespace()
    alone = RateMeter()
    batched_step(alone, local, one, 0.004, None, config.n_layers)
    batched_step(alone, local, (BatchRow(0, (5, 6, 7), 0),), 0.01, None, config.n_layers)  # a prompt chunk: not
    assert alone.rate == pytest.approx(250)


def load_model_config(spec):
    """The ModelConfig of a random model of `spec` (written to a temporary file)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        return load_model(write_random_llama(Path(d) / "m.gguf", spec)).config


def test_the_driver_tells_on_step_of_every_step_with_its_rows_and_time(model):
    """BatchService calls on_step(engine, rows, seconds) after each step it ran (the root's rate meter hangs there)."""
    m, tok = model
    seen = []

    async def make(c: int) -> SoloBatch:
        return SoloBatch(lambda: _engine(m.config, tok, c), 2)

    svc = BatchService(BatchConfig(max_batch=2, chunk=16), "root-test", clock=trio.current_time,
                       on_step=lambda engine, rows, seconds: seen.append((engine, len(rows), seconds)))
    svc.attach(make, tok, 64, 64)
    sink = Sink()

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(svc.generate, sink, _gen(_prompt(70, 4), 5, 64), list(_prompt(70, 4)))
            await trio.sleep(0.01)
            while svc.busy():
                await svc.step()
                await trio.sleep(0.001)

    trio.run(main)
    assert len(seen) == svc.steps == 5 and all(isinstance(e, SoloBatch) and n == 1 and s > 0 for e, n, s in seen)
