"""The engine with shared-prefix (cascade) decode: n-way samples of a prompt decode with the prompt's blocks read
once per group, and give the same samples as with cascade off — while samples finish and leave their group
(stop tokens), while the cache is too small and sequences are preempted and recomputed mid-generation, with
prompts ending mid-block, for MLA (tiny-v2) and GQA (tiny-qwen3), eagerly and through the CUDA-graph replay
path (static, padded cascade buffers; emulated on CPU)."""

import pytest
import torch
from replay import install_replayed_graphs
from tiny_models import make_model

import dsmath_kernels as dk
from model.engine import LLM, SamplingParams
from model.engine import model_runner as mr

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["tiny-v2", "tiny-qwen3"])
def model(request):
    return make_model(request.param)


def rollout(model, *, cascade: bool, num_blocks: int, replay: bool = False):
    """3 prompts (13, 22 and 8 tokens: all end mid-block) x 4 seeded samples with a stop token: samples stop at
    different steps. Returns the outputs and the cascades the runner built."""
    g = torch.Generator().manual_seed(3)
    ps = [torch.randint(2, 128, (n,), generator=g).tolist() for n in (13, 22, 8)]
    stops = list(range(100, 120))
    params = [SamplingParams(n=4, temperature=1.0, seed=s, max_tokens=14, stop_token_ids=stops, logprobs=0)
              for s in (1, 2, 3)]
    llm = LLM(model, num_blocks=num_blocks, block_size=4, max_num_seqs=12, cascade=cascade)
    if replay:
        install_replayed_graphs(llm.runner, 12)
    seen = []
    build = llm.runner._cascade

    def spy(*a, **k):
        sp = build(*a, **k)
        seen.append(sp)
        return sp

    llm.runner._cascade = spy
    outs = llm.generate(ps, params, use_tqdm=False)
    assert llm.block_manager.check_all_free()
    return outs, seen, llm


def same_samples(a, b):
    for x, y in zip(a, b):
        assert [c.token_ids for c in x.outputs] == [c.token_ids for c in y.outputs]
        for cx, cy in zip(x.outputs, y.outputs):
            torch.testing.assert_close(torch.tensor(cx.token_logprobs), torch.tensor(cy.token_logprobs), atol=1e-4,
                                       rtol=1e-4)


def test_cascade_gives_the_same_samples(model):
    off, none, _ = rollout(model, cascade=False, num_blocks=128)
    assert not any(none)
    on, seen, _ = rollout(model, cascade=True, num_blocks=128)
    same_samples(on, off)
    used = [sp for sp in seen if sp is not None]
    assert used, "no decode step found shared prompt blocks"
    sizes = sorted({int(sp.members.shape[0]) for sp in used})
    assert max(sizes) >= 8 and min(sizes) < max(sizes), "groups should shrink as samples stop"
    lens = [len(c.token_ids) for o in on for c in o.outputs]
    assert min(lens) < max(lens), "samples should finish at different steps"


def test_cascade_under_preemption_and_graph_replay(model):
    want, _, _ = rollout(model, cascade=False, num_blocks=128)
    got, seen, llm = rollout(model, cascade=True, num_blocks=22)  # 12 samples of ~30 tokens do not fit
    assert llm.scheduler.num_preemptions > 0
    assert any(sp is not None for sp in seen)
    same_samples(got, want)
    replayed, seen, llm = rollout(model, cascade=True, num_blocks=128, replay=True)
    assert any(sp is not None and sp.prefix_lens.shape[0] in llm.runner.sizes for sp in seen)  # padded to graphs
    same_samples(replayed, want)


def test_plans_count_heads_and_are_bucketed_by_context(model, monkeypatch):
    """Decode plans get the model's head counts; graphs are keyed by (batch, context bucket, cascade), and buckets
    whose plans coincide share one graph."""
    calls = []
    monkeypatch.setattr(mr, "plan_decode", lambda *a, **k: calls.append(k) or dk.plan_decode(*a, **k))
    monkeypatch.setattr(dk.attention, "_num_workers", lambda device: 64)  # a device with room for splits
    llm = LLM(model, num_blocks=64, block_size=4, max_num_seqs=4, max_model_len=200000, allow_long_max_model_len=True)
    r = llm.runner
    assert r.buckets == [4096, 16384, 65536, 200000]
    r._plan(2, 100)
    assert calls[-1]["num_q_heads"] == model.config.num_attention_heads
    assert calls[-1]["num_kv_heads"] == (1 if model.config.is_mla else model.config.num_key_value_heads)
    assert calls[-1]["tiled"] == model.config.is_mla
    keys = r.graph_keys(4)
    assert {k[0] for k in keys} == {1, 2, 4} and {k[2] for k in keys} == {False, True}
    assert all(not k[2] for k in keys if k[0] == 1)  # one row shares nothing
    short, long_ = r._plan(1, 4096), r._plan(1, 200000)
    assert long_.num_splits > short.num_splits > 1  # a short context is not planned as if it were 200K long
    assert keys[(1, 4096, False)] != keys[(1, 200000, False)]
