"""AsyncLLM (model/engine/async_llm.py) in process, on the mock model: concurrent streams equal LLM.generate, an
abandoned stream frees its blocks, the bounded queue, per-request errors, a failing step, shutdown."""

import asyncio

import pytest
from tiny_models import word_tokenizer

from model.engine import LLM, AsyncLLM, EngineClosedError, QueueFullError, RequestError, SamplingParams
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
