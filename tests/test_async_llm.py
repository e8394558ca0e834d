"""AsyncLLM (model/engine/async_llm.py) on the mock model, in process and with an engine process (engine_core.py):
concurrent streams equal LLM.generate (streamed text too, whether the engine or the front end detokenizes), an
abandoned stream frees its blocks, the bounded queue, per-request errors, a failing step, graceful shutdown; and
for the engine process: its death fails what is in flight (no hang), it exits when the front end goes, a build
error reaches the caller, the message framing."""

import asyncio
import functools
import os
import pickle
import signal

import pytest
from tiny_models import mock_llm, word_tokenizer

from model.engine import LLM, AsyncLLM, EngineClosedError, QueueFullError, RequestError, SamplingParams
from model.engine.async_llm import EngineDeadError
from model.engine.engine_core import Unframer, frame
from model.engine.mock_model import MockPagedModel

V = 64
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return MockPagedModel(vocab_size=V, eos_token_id=None, seed=4)


def make_llm(model, **kw):
    return LLM(model, num_blocks=128, block_size=4, tokenizer=word_tokenizer(V), **kw)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


def test_concurrent_streams_equal_generate(model):
    prompts = [f"w{i} w{i + 1} w{i + 2}" for i in range(12)]
    params = [SamplingParams(n=1 + i % 2, temperature=1.0, max_tokens=4 + i % 5, seed=i, logprobs=1) for i in
              range(12)]
    want = make_llm(model).generate(prompts, params, use_tqdm=False)

    async def main():
        engine = AsyncLLM(make_llm(model))
        await engine.start()

        async def one(p, sp):
            toks, texts = {}, {}
            async for events in engine.stream(p, sp):
                for ev in events:
                    toks.setdefault(ev.index, []).append(ev.token_id)
                    texts[ev.index] = texts.get(ev.index, "") + ev.text
            return toks, texts

        got = await asyncio.gather(*(one(p, sp) for p, sp in zip(prompts, params)))
        finals = await asyncio.gather(*(engine.generate(p, sp) for p, sp in zip(prompts, params)))
        await engine.shutdown()
        assert engine.llm.block_manager.check_all_free()
        return got, finals

    got, finals = run(main())
    for w, (toks, texts), f in zip(want, got, finals):
        assert [toks[c.index] for c in w.outputs] == [c.token_ids for c in w.outputs]
        assert [texts[c.index] for c in w.outputs] == [c.text for c in w.outputs]
        assert [c.token_ids for c in f.outputs] == [c.token_ids for c in w.outputs]
        assert [c.token_logprobs for c in f.outputs] == [c.token_logprobs for c in w.outputs]


def test_abandoned_stream_is_aborted_and_frees_blocks(model):
    async def main():
        engine = AsyncLLM(make_llm(model))
        await engine.start()
        agen = engine.stream([1, 2, 3, 4, 5], SamplingParams(max_tokens=200, ignore_eos=True))
        await agen.__anext__()
        assert engine.llm.block_manager.num_free < engine.llm.block_manager.num_blocks
        await agen.aclose()                                  # the consumer leaves (a client disconnect)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if engine.llm.block_manager.check_all_free():
                break
        assert engine.llm.block_manager.check_all_free() and not engine.llm.requests
        assert engine.stats.aborted == 1
        task = asyncio.create_task(engine.generate([1, 2], SamplingParams(max_tokens=500, ignore_eos=True)))
        await asyncio.sleep(0.05)
        task.cancel()                                        # a cancelled non-streaming wait aborts too
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            await asyncio.sleep(0.01)
            if engine.llm.block_manager.check_all_free():
                break
        assert engine.llm.block_manager.check_all_free() and engine.stats.aborted == 2
        await engine.shutdown()

    run(main())


def test_queue_bound_errors_and_shutdown(model):
    async def main():
        engine = AsyncLLM(make_llm(model, max_num_seqs=1), max_waiting_requests=2)
        with pytest.raises(EngineClosedError):
            engine.add_request([1], SamplingParams())         # not started
        await engine.start()
        a = engine.add_request([1, 2], SamplingParams(max_tokens=3))
        engine.add_request([3, 4], SamplingParams(max_tokens=3))
        with pytest.raises(QueueFullError, match="waiting"):
            engine.add_request([5, 6], SamplingParams(max_tokens=3))
        with pytest.raises(RequestError, match="token ids"):
            engine.abort(a) or engine.add_request([V + 1], SamplingParams())
        out = await engine.generate([7, 8], SamplingParams(max_tokens=3, temperature=0))
        assert len(out.outputs[0].token_ids) == 3
        await engine.shutdown(timeout=5)
        with pytest.raises(EngineClosedError):
            engine.add_request([1], SamplingParams())
        assert not engine.is_running

    run(main())


def test_a_failing_step_fails_its_requests_not_the_engine(model):
    async def main():
        engine = AsyncLLM(make_llm(model))
        await engine.start()
        real, calls = engine.llm.compute_step, []

        def broken():
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("boom")
            return real()

        engine.llm.compute_step = broken
        with pytest.raises(RuntimeError, match="boom"):
            await engine.generate([1, 2, 3], SamplingParams(max_tokens=10, ignore_eos=True))
        out = await engine.generate([1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
        assert len(out.outputs[0].token_ids) == 4 and engine.llm.block_manager.check_all_free()
        await engine.shutdown()

    run(main())


def test_stream_interval_batches_events_without_losing_any(model):
    async def main():
        engine = AsyncLLM(make_llm(model), stream_interval=3)
        await engine.start()
        sizes, toks = [], []
        async for events in engine.stream([1, 2, 3], SamplingParams(max_tokens=11, temperature=0, ignore_eos=True)):
            sizes.append(len(events))
            toks += [e.token_id for e in events]
        await engine.shutdown()
        return sizes, toks

    sizes, toks = run(main())
    want = make_llm(model).generate([[1, 2, 3]], SamplingParams(max_tokens=11, temperature=0, ignore_eos=True),
                                    use_tqdm=False)[0].outputs[0].token_ids
    assert toks == want and sizes[0] == 1 and all(s % 3 == 0 for s in sizes[1:-1]) and sum(sizes) == 11


# ---- engine process -----------------------------------------------------------------------------------------------
POISON = V - 2    # a request whose prompt starts with this token makes the engine's step raise (tiny_models.mock_llm)


def process_engine(**kw) -> AsyncLLM:
    return AsyncLLM.with_engine_process(functools.partial(mock_llm, V, 4, POISON, num_blocks=128, block_size=4),
                                        torch_threads=1, **kw)


async def wait_for(cond, timeout: float = 10.0) -> bool:
    for _ in range(int(timeout / 0.01)):
        if cond():
            return True
        await asyncio.sleep(0.01)
    return cond()


def test_framing_splits_and_joins_messages():
    msgs = [("step", [(1, 0, 5, None, "", None, None, None)], {}, (1, 7)), ("stats", (0, 128)), "x" * 70000]
    data = b"".join(frame(m) for m in msgs)
    u = Unframer()
    got = [m for i in range(0, len(data), 1000) for m in u.feed(data[i:i + 1000])]   # pieces of 1000 bytes
    assert got == msgs and not u.buf
    assert Unframer().feed(data[:-1]) == msgs[:2]                                    # a partial one waits
    assert pickle.loads(frame(msgs[0])[8:]) == msgs[0]


def test_engine_process_streams_aborts_errors_and_shutdown(model):
    """One engine process: streams (with and without stop strings: engine-side and front-end detokenization) equal
    in-process LLM.generate; an abandoned stream frees its blocks; the queue bound; a bad request; a failing step;
    a graceful shutdown that lets the running request finish."""
    prompts = [f"w{i} w{i + 1} w{i + 2}" for i in range(12)]
    params = [SamplingParams(n=1 + i % 2, temperature=1.0, max_tokens=4 + i % 5, seed=i, logprobs=1,
                             stop=[" w1", "w2"] if i % 3 == 0 else None, include_stop_str_in_output=i % 6 == 0)
              for i in range(12)]
    want = make_llm(model).generate(prompts, params, use_tqdm=False)
    assert any(c.finish_reason == "stop" for w in want for c in w.outputs)       # a stop string did cut
    want_pieces = {}                                         # (prompt, sample) -> streamed text pieces in process
    for ev in make_llm(model).stream(prompts, params):
        want_pieces.setdefault((ev.request_id, ev.index), []).append(ev.text)

    async def main():
        engine = process_engine()
        assert engine.engine_pid != os.getpid()
        with pytest.raises(EngineClosedError):
            engine.add_request([1], SamplingParams())         # not started
        await engine.start()

        async def one(p, sp):
            toks, pieces = {}, {}
            async for events in engine.stream(p, sp):
                for ev in events:
                    toks.setdefault(ev.index, []).append(ev.token_id)
                    pieces.setdefault(ev.index, []).append(ev.text)
            return toks, pieces

        got = await asyncio.gather(*(one(p, sp) for p, sp in zip(prompts, params)))
        finals = await asyncio.gather(*(engine.generate(p, sp) for p, sp in zip(prompts, params)))
        assert await wait_for(lambda: engine.kv_cache_blocks() == (0, 128))

        agen = engine.stream([1, 2, 3, 4, 5], SamplingParams(max_tokens=400, ignore_eos=True))
        await agen.__anext__()
        assert engine.kv_cache_blocks()[0] > 0
        await agen.aclose()                                  # the consumer leaves: aborted, blocks freed
        await engine.generate([7, 8], SamplingParams(max_tokens=3))   # 3 steps later: the 400-token one is gone
        assert engine.kv_cache_blocks()[0] == 0 and engine.stats.aborted == 1

        engine.max_waiting_requests = 2
        a = engine.add_request([1, 2], SamplingParams(max_tokens=3))
        b = engine.add_request([3, 4], SamplingParams(max_tokens=3))
        with pytest.raises(QueueFullError, match="waiting"):
            engine.add_request([5, 6], SamplingParams(max_tokens=3))
        engine.abort(a), engine.abort(b)
        engine.max_waiting_requests = 256
        with pytest.raises(RequestError, match="token ids"):  # validated in this process, before anything is sent
            engine.add_request([V + 1], SamplingParams())

        with pytest.raises(RuntimeError, match="boom"):
            await engine.generate([POISON, 1], SamplingParams(max_tokens=10, ignore_eos=True))
        out = await engine.generate([1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
        assert len(out.outputs[0].token_ids) == 4

        running = asyncio.ensure_future(engine.generate([1, 2], SamplingParams(max_tokens=30, ignore_eos=True)))
        await asyncio.sleep(0.05)
        await engine.shutdown(timeout=30)
        assert len((await running).outputs[0].token_ids) == 30          # finished, not cut
        assert engine._core.proc.exitcode == 0 and not engine.is_running
        with pytest.raises(EngineClosedError):
            engine.add_request([1], SamplingParams())
        return got, finals

    got, finals = run(main())
    for i, (w, (toks, pieces), f) in enumerate(zip(want, got, finals)):
        assert [toks[c.index] for c in w.outputs] == [c.token_ids for c in w.outputs]
        assert ["".join(pieces[c.index]) for c in w.outputs] == [c.text for c in w.outputs]
        assert [pieces[c.index] for c in w.outputs] == [want_pieces[i, c.index] for c in w.outputs]  # as streamed
        assert [(c.text, c.token_ids, c.finish_reason, c.stop_reason) for c in f.outputs] == \
               [(c.text, c.token_ids, c.finish_reason, c.stop_reason) for c in w.outputs]
        assert [c.token_logprobs for c in f.outputs] == [c.token_logprobs for c in w.outputs]


def test_engine_process_death_fails_requests_in_flight_and_refuses_new_ones():
    async def main():
        engine = process_engine()
        await engine.start()
        agen = engine.stream([1, 2, 3], SamplingParams(max_tokens=400, ignore_eos=True))
        await agen.__anext__()
        waiting = asyncio.ensure_future(engine.generate([4, 5], SamplingParams(max_tokens=400, ignore_eos=True)))
        os.kill(engine.engine_pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="engine process died"):
            async for _ in agen:
                pass
        with pytest.raises(RuntimeError, match="engine process died"):
            await waiting
        assert not engine.is_running and "signal 9" in engine.dead
        with pytest.raises(EngineDeadError, match="engine process died"):
            engine.add_request([1], SamplingParams())
        await engine.shutdown(timeout=5)

    run(main())


def test_engine_process_exits_when_the_front_end_goes():
    async def main():
        engine = process_engine()
        await engine.start()
        await engine.generate([1, 2], SamplingParams(max_tokens=2))
        engine._core.transport.abort()        # the front end's end of the socket closes, as when it dies
        await asyncio.to_thread(engine._core.proc.join, 10)
        assert engine._core.proc.exitcode == 0
        assert await wait_for(lambda: engine.dead is not None, 2)

    run(main())


def test_engine_process_build_error_reaches_the_caller():
    with pytest.raises(RuntimeError, match="block_size"):
        AsyncLLM.with_engine_process(functools.partial(mock_llm, V, block_size=0), torch_threads=1)


def test_split_cpus_and_engine_cpus_option(monkeypatch):
    """engine_core.split_cpus gives the engine process the last T CPUs and the front end the others; `dsmath serve
    --engine-cpus` pins CPU engines only (auto), refuses lists it cannot honour, and `no` turns it off."""
    from model.engine import engine_core
    from model.serve import cli

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert engine_core.split_cpus(1) == ({5}, {0, 2})
    assert engine_core.split_cpus(2) == ({2, 5}, {0})
    assert engine_core.split_cpus(3) is None                     # nothing left for the front end
    assert engine_core.split_cpus(0) is None

    def spec(*argv):
        return cli.engine_cpus(cli.parse(["--model", "m", *argv]))
    assert spec("--device", "cpu", "--threads", "1") == ({5}, {0, 2})                       # auto
    assert spec("--device", "cpu") is None                      # no --threads: torch would use every CPU
    assert spec("--device", "cuda", "--threads", "1") is None   # GPU engines are not pinned by auto
    assert spec("--device", "cpu", "--threads", "1", "--engine-cpus", "no") is None
    assert spec("--engine-cpus", "2,5") == ({2, 5}, {0})
    for bad in ("1", "0,2,5", "x"):
        with pytest.raises(SystemExit, match="--engine-cpus"):
            spec("--engine-cpus", bad)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is a Linux API")
def test_engine_process_runs_on_its_cpus():
    cpu = max(os.sched_getaffinity(0))

    async def main():
        engine = process_engine(engine_cpus=frozenset({cpu}))
        await engine.start()
        try:
            out = await engine.generate([1, 2], SamplingParams(max_tokens=3, ignore_eos=True))
            assert len(out.outputs[0].token_ids) == 3
            assert os.sched_getaffinity(engine.engine_pid) == {cpu}
        finally:
            await engine.shutdown()

    run(main())


def test_inbox_hands_over_everything_that_arrived_and_survives_a_cancelled_wait():
    from model.engine.async_llm import _Inbox

    async def go():
        box = _Inbox()
        box.put_nowait(("events", [1]))
        box.put_nowait(("events", [2]))
        assert await box.take() == [("events", [1]), ("events", [2])]   # no wait: both at once, in order
        waiter = asyncio.ensure_future(box.take())
        await asyncio.sleep(0)
        waiter.cancel()                                                  # a consumer cancelled while waiting
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert box.waiter is None
        box.put_nowait(("done", None))                                   # no waiter: kept for the next take
        late = asyncio.ensure_future(box.take())
        await asyncio.sleep(0)
        assert late.done() and late.result() == [("done", None)]
        later = asyncio.ensure_future(box.take())
        await asyncio.sleep(0)
        assert not later.done()                                          # nothing left: it waits ...
        box.put_nowait(("aborted", None))
        assert await later == [("aborted", None)]                        # ... until the next item

    asyncio.run(go())
