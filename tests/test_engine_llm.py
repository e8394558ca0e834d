"""LLM end to end on a tiny mock model (model/engine/mock_model.py): greedy parity with a full-forward loop,
log-probs, shared prompt blocks of n samples, preemption, stops, seeds, streaming, prefix caching, block leaks."""

import pytest
import torch
from replay import install_replayed_graphs
from tiny_models import word_tokenizer

from model.engine import LLM, RequestError, SamplingParams
from model.engine.mock_model import MockPagedModel

V = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return MockPagedModel(vocab_size=V, eos_token_id=None)


def prompts(k: int, seed: int = 0, lo: int = 1, hi: int = 20) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (k,), generator=g).tolist()
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lens]


def greedy_ref(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    ids, toks, lps = list(ids), [], []
    for _ in range(n):
        logp = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
        t = int(logp.argmax())
        toks.append(t)
        lps.append(float(logp[t]))
        ids.append(t)
    return toks, lps


def check_free(llm: LLM):
    assert llm.block_manager.check_all_free() and not llm.has_unfinished()


@pytest.mark.parametrize("block_size,budget", [(4, 16), (16, 7), (1, 64)])
def test_greedy_matches_full_forward(model, block_size, budget):
    ps = prompts(5, seed=block_size)
    llm = LLM(model, num_blocks=256, block_size=block_size, max_num_batched_tokens=budget)
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=10, logprobs=0), use_tqdm=False)
    for p, o in zip(ps, outs):
        toks, lps = greedy_ref(model, p, 10)
        c = o.outputs[0]
        assert o.prompt_token_ids == p and c.token_ids == toks and c.finish_reason == "length" and c.text is None
        torch.testing.assert_close(torch.tensor(c.token_logprobs), torch.tensor(lps), atol=1e-5, rtol=1e-5)
    check_free(llm)


def test_n_samples_share_prompt_blocks_then_copy_on_write(model):
    llm = LLM(model, num_blocks=64, block_size=4)
    prompt = prompts(1, seed=3, lo=10, hi=11)[0]            # 10 tokens: 2 full blocks + 1 partial
    rid = llm.add_request(prompt, SamplingParams(n=4, temperature=1.0, max_tokens=6, seed=0))
    llm.step()                                              # prefill once, fork, first token of each sample
    bm = llm.block_manager
    samples = llm.requests[rid].samples
    assert len(samples) == 4 and llm.stats.prompt_tokens == 10
    assert bm.num_blocks - bm.num_free == 3                 # the prompt's 3 blocks, shared 4 ways
    assert all(s.block_table == samples[0].block_table for s in samples.values())
    assert all(bm.blocks[b].ref == 4 for b in samples[0].block_table)
    llm.step()                                              # each sample writes its token: 3 copies of block 2
    assert bm.num_blocks - bm.num_free == 2 + 4
    assert len({s.block_table[2] for s in samples.values()}) == 4
    assert all(s.block_table[:2] == samples[0].block_table[:2] for s in samples.values())
    while llm.has_unfinished():
        llm.step()
    out = llm.finished.pop(rid)
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # the samples differ
    check_free(llm)


def test_n_samples_continue_their_own_prefix(model):
    """Each sample's continuation must be computed from ITS tokens (catches a wrong copy-on-write)."""
    llm = LLM(model, num_blocks=64, block_size=4)
    prompt = prompts(1, seed=4, lo=9, hi=10)[0]
    out = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=5, logprobs=0),
                       use_tqdm=False)[0]
    for c in out.outputs:
        ids = prompt + c.token_ids
        logits = model(torch.tensor([ids])).logits[0, len(prompt) - 1:-1]   # [8, V]
        want = logits.log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.token_logprobs), want, atol=1e-5, rtol=1e-5)


def test_preemption_loses_nothing_and_keeps_greedy(model):
    ps = prompts(6, seed=7, lo=5, hi=12)
    params = SamplingParams(temperature=0, max_tokens=12)
    want = LLM(model, num_blocks=256, block_size=4).generate(ps, params, use_tqdm=False)
    small = LLM(model, num_blocks=8, block_size=4)           # one sequence needs up to 6 blocks
    got = small.generate(ps, params, use_tqdm=False)
    assert small.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    check_free(small)


def test_preemption_of_forked_samples(model):
    llm = LLM(model, num_blocks=9, block_size=4)
    p = SamplingParams(n=3, temperature=0.0, max_tokens=12)
    out = llm.generate(prompts(2, seed=8, lo=6, hi=9), p, use_tqdm=False)
    assert llm.scheduler.num_preemptions > 0
    for o in out:
        assert len({tuple(c.token_ids) for c in o.outputs}) == 1 and len(o.outputs[0].token_ids) == 12
    check_free(llm)


def test_stop_token_ids_eos_and_ignore_eos():
    m = MockPagedModel(vocab_size=V, eos_token_id=None, seed=1)
    ps = prompts(3, seed=9)
    free = LLM(m, num_blocks=128, block_size=4).generate(ps, SamplingParams(temperature=0, max_tokens=10),
                                                          use_tqdm=False)
    stop = free[0].outputs[0].token_ids[3]
    llm = LLM(m, num_blocks=128, block_size=4)
    out = llm.generate(ps, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop]), use_tqdm=False)
    for f, o in zip(free, out):
        toks = f.outputs[0].token_ids
        k = toks.index(stop) + 1 if stop in toks else len(toks)
        assert o.outputs[0].token_ids == toks[:k]
        assert o.outputs[0].finish_reason == ("stop" if stop in toks else "length")
    m.config.eos_token_id = stop
    eos = LLM(m, num_blocks=128, block_size=4).generate(ps[:1], SamplingParams(temperature=0, max_tokens=10),
                                                         use_tqdm=False)[0].outputs[0]
    assert eos.token_ids == out[0].outputs[0].token_ids and eos.finish_reason == "stop"
    ign = LLM(m, num_blocks=128, block_size=4).generate(
        ps[:1], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert ign.token_ids == free[0].outputs[0].token_ids and ign.finish_reason == "length"


def test_text_stop_strings_and_streaming(model):
    tok = word_tokenizer(V)
    llm = LLM(model, num_blocks=128, block_size=4, tokenizer=tok)
    prompt = "w1 w2 w3 w4"
    base = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0].outputs[0]
    assert base.text == " " + tok.decode(base.token_ids)  # decoded after the prompt: leading space kept
    words = base.text.split(" ")
    stop = f"{words[4]} {words[5]}"                  # a stop string spanning two tokens
    cut = base.text.index(stop)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10, stop=[stop, "zzz"]),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == base.text[:cut] and out.finish_reason == "stop"
    assert out.token_ids == base.token_ids[: len(out.token_ids)] and len(out.token_ids) <= 6
    events = list(llm.stream([prompt], SamplingParams(temperature=0, max_tokens=10, stop=stop)))
    assert [e.token_id for e in events] == out.token_ids
    assert "".join(e.text for e in events) == out.text and events[-1].finish_reason == "stop"
    check_free(llm)
    it = llm.stream([prompt] * 3, SamplingParams(temperature=0, max_tokens=10))
    assert next(it).request_id is not None
    it.close()                                       # stopping early aborts the rest
    check_free(llm)


def test_seeded_requests_reproducible_in_any_batch(model):
    p = SamplingParams(temperature=1.0, max_tokens=8, seed=42, n=2)
    llm = LLM(model, num_blocks=256, block_size=4)
    alone = llm.generate([[1, 2, 3]], p, use_tqdm=False)[0]
    others = prompts(4, seed=11)
    mixed = llm.generate(others[:2] + [[1, 2, 3]] + others[2:],
                         [SamplingParams(temperature=1.0, max_tokens=5)] * 2 + [p] + [SamplingParams()] * 2,
                         use_tqdm=False)[2]
    assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in mixed.outputs]
    assert alone.outputs[0].token_ids != alone.outputs[1].token_ids
    other_seed = llm.generate([[1, 2, 3]], SamplingParams(temperature=1.0, max_tokens=8, seed=43, n=2),
                              use_tqdm=False)[0]
    assert [c.token_ids for c in other_seed.outputs] != [c.token_ids for c in alone.outputs]


def test_prefix_caching_hits_and_keeps_outputs(model):
    shared = prompts(1, seed=12, lo=13, hi=14)[0]
    ps = [shared + [5, 6], shared + [7], shared]
    params = SamplingParams(temperature=0, max_tokens=6)
    want = LLM(model, num_blocks=64, block_size=4).generate(ps, params, use_tqdm=False)
    llm = LLM(model, num_blocks=64, block_size=4, enable_prefix_caching=True)
    got = [llm.generate([p], params, use_tqdm=False)[0] for p in ps]
    assert llm.block_manager.num_prefix_hits >= 6
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    check_free(llm)
    llm.reset_prefix_cache()                                 # e.g. after a weight update: nothing is reused
    hits = llm.block_manager.num_prefix_hits
    llm.generate([ps[0]], params, use_tqdm=False)
    assert llm.block_manager.num_prefix_hits == hits


def test_max_model_len_and_errors(model):
    """A request that cannot be served raises from add_request, and fails ALONE in generate (finish_reason
    "error", the message in RequestOutput.error) while the rest of the batch is served."""
    llm = LLM(model, num_blocks=16, block_size=4, max_model_len=12)
    out = llm.generate([[1] * 8], SamplingParams(temperature=0, max_tokens=50), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
    bad = {"tokenizer": ("hello", None), "token ids": ([1, V], None), "max_model_len": ([1] * 12, None),
           "stop": ([1], SamplingParams(stop="x")), "max_num_seqs": ([1], SamplingParams(n=300))}
    for match, (prompt, params) in bad.items():
        with pytest.raises(RequestError, match=match):
            llm.add_request(prompt, params)
    prompts = [[2, 3]] + [p for p, _ in bad.values()] + [[4, 5]]
    params = [SamplingParams(temperature=0, max_tokens=3)] + [p or SamplingParams() for _, p in bad.values()] + \
        [SamplingParams(temperature=0, max_tokens=3)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].finish_reason for o in outs] == ["length"] + ["error"] * len(bad) + ["length"]
    for (match, _), o in zip(bad.items(), outs[1:-1]):
        assert match in o.error and o.outputs[0].token_ids == [] and o.finished
    assert outs[0].outputs[0].token_ids == greedy_ref(model, [2, 3], 3)[0]
    assert len(outs[1 + list(bad).index("max_num_seqs")].outputs) == 300   # one error output per sample
    with pytest.raises(RequestError, match="KV blocks"):
        LLM(model, num_blocks=2, block_size=4).add_request([1] * 9)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    check_free(llm)


def test_abort_frees_everything(model):
    llm = LLM(model, num_blocks=64, block_size=4)
    a = llm.add_request([1, 2, 3, 4, 5], SamplingParams(n=3, temperature=1.0, max_tokens=20))
    b = llm.add_request([6, 7], SamplingParams(max_tokens=20))
    c = llm.add_request([8] * 9, SamplingParams(max_tokens=3, temperature=0))
    llm.step()
    llm.step()
    llm.abort(a)
    llm.abort(b)
    llm.abort(12345)
    while llm.has_unfinished():
        llm.step()
    assert list(llm.finished) == [c] and len(llm.finished[c].outputs[0].token_ids) == 3
    check_free(llm)


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_fuzz_arrivals_forks_preemption_prefix_cache(model, prefix_caching):
    """Requests join between steps, with n-way forks, shared prefixes, chunked prefill and a cache small enough
    to preempt: every greedy sample equals the full-forward reference and every block comes back."""
    g = torch.Generator().manual_seed(21)
    base = torch.randint(0, V, (12,), generator=g).tolist()
    llm = LLM(model, num_blocks=14, block_size=4, max_num_batched_tokens=10, max_num_seqs=6,
              enable_prefix_caching=prefix_caching)
    want, step = {}, 0
    while len(want) < 10 or llm.has_unfinished():
        if len(want) < 10 and int(torch.randint(0, 2, (1,), generator=g)):
            k = int(torch.randint(1, 12, (1,), generator=g))
            prompt = base[: int(torch.randint(0, 12, (1,), generator=g))] + torch.randint(0, V, (k,),
                                                                                          generator=g).tolist()
            n, new = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 12, (1,), generator=g))
            rid = llm.add_request(prompt, SamplingParams(n=n, temperature=0, max_tokens=new))
            want[rid] = (greedy_ref(model, prompt, new)[0], n)
        llm.step()
        step += 1
        assert step < 2000
    assert llm.scheduler.num_preemptions > 0
    assert (llm.block_manager.num_prefix_hits > 0) == prefix_caching
    for rid, (toks, n) in want.items():
        assert [c.token_ids for c in llm.finished.pop(rid).outputs] == [toks] * n
    check_free(llm)


def test_graph_replay_path_matches_eager(model):
    """The CUDA-graph decode path's host side (static buffers, padding rows, size buckets) on CPU."""
    ps = prompts(7, seed=30)
    params = SamplingParams(temperature=0, max_tokens=9, logprobs=0)
    want = LLM(model, num_blocks=128, block_size=4).generate(ps, params, use_tqdm=False)
    llm = LLM(model, num_blocks=128, block_size=4, max_num_seqs=8)
    install_replayed_graphs(llm.runner, 8)
    got = llm.generate(ps, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    for a, b in zip(got, want):
        torch.testing.assert_close(a.outputs[0].token_logprobs, b.outputs[0].token_logprobs)
    assert llm.stats.decode_steps > 0
    check_free(llm)
