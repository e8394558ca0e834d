"""The engine records routing (`SamplingParams(return_routing=True)` -> `CompletionOutput.routing`): per fed token
(prompt from the prefill, completion but its last token) and MoE layer, the experts the engine's forward picked —
through n-sample forks (shared prompt blocks, copy-on-write), chunked prefill and preemption — and replaying them in
the full forward reproduces the engine's log-probs (fp32: to 1e-5)."""

import pytest
import torch
from tiny_models import make_model

from model.engine import LLM, SamplingParams
from model.engine.mock_model import MockPagedModel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return make_model("tiny-v3")  # sigmoid + bias, groups: replay must not depend on either


def _prompts(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 100, (int(n),), generator=g).tolist() for n in torch.randint(3, 11, (k,), generator=g)]


def _check(model, prompt, c, temperature):
    """Routing layout and content, and the replayed full forward's log-probs vs the engine's."""
    L, K = model.num_moe_layers, model.config.num_experts_per_tok
    row = prompt + c.token_ids
    assert c.routing.shape == (len(row) - 1, L, K) and c.routing.dtype == torch.int16
    ids = torch.tensor([row[:-1]])
    with torch.no_grad():
        own = model(ids, return_routing=True)
        replay = model(ids, routing=c.routing[None], return_hidden=True)
    assert torch.equal(own.routing[0].sort(-1).values, c.routing.sort(-1).values)  # decisive fp32 routing
    logp = (replay.hidden[0] @ model.lm_head.weight.T / temperature).log_softmax(-1)
    lp = logp[len(prompt) - 1:].gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(lp, torch.tensor(c.token_logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("block_size,budget", [(4, 8192), (3, 7)])  # 7 tokens a step: chunked prefill
def test_routing_of_forked_samples(model, block_size, budget):
    llm = LLM(model, num_blocks=128, block_size=block_size, max_num_batched_tokens=budget)
    ps = _prompts(3)
    params = SamplingParams(n=3, temperature=0.8, max_tokens=6, seed=1, logprobs=0,
                            logprobs_mode="processed_logprobs", return_routing=True)
    outs = llm.generate(ps, params, use_tqdm=False)
    for p, o in zip(ps, outs):
        for c in o.outputs:
            _check(model, p, c, 0.8)
    assert llm.block_manager.check_all_free()
    plain = llm.generate(ps[:1], SamplingParams(max_tokens=3), use_tqdm=False)[0].outputs[0]
    assert plain.routing is None


def test_routing_survives_preemption(model):
    llm = LLM(model, num_blocks=9, block_size=4)  # too few blocks for 4 samples of 14+ tokens: preemption
    ps = _prompts(2, seed=3)
    outs = llm.generate(ps, SamplingParams(n=2, temperature=1.0, max_tokens=12, seed=5, logprobs=0,
                                           logprobs_mode="processed_logprobs", return_routing=True, ignore_eos=True),
                        use_tqdm=False)
    assert llm.scheduler.num_preemptions > 0
    for p, o in zip(ps, outs):
        for c in o.outputs:
            _check(model, p, c, 1.0)


def test_return_routing_needs_a_recording_engine(model):
    with pytest.raises(ValueError, match="return_routing"):
        LLM(model, num_blocks=32, block_size=4, record_routing=False).add_request(
            [1, 2, 3], SamplingParams(return_routing=True))
    out = LLM(MockPagedModel(), num_blocks=32, block_size=4).generate(      # in a batch: that request fails alone
        [[1, 2, 3]], SamplingParams(return_routing=True), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "error" and "return_routing" in out.error
    with pytest.raises(ValueError, match="record_routing"):
        LLM(MockPagedModel(), num_blocks=32, block_size=4, record_routing=True)
    with pytest.raises(TypeError, match="return_routing"):
        SamplingParams(return_routing=1)


@pytest.mark.gpu
def test_routing_with_cuda_graphs():
    """Decode steps replay CUDA graphs: the graphs record the experts too (padding rows write nowhere)."""
    model = make_model("tiny-v2").cuda()
    llm = LLM(model, num_blocks=128, block_size=16, max_num_seqs=8)
    assert llm.runner.graphs, llm.runner.capture_error
    ps = _prompts(3, seed=7)
    outs = llm.generate(ps, SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=2, logprobs=0,
                                           logprobs_mode="processed_logprobs", return_routing=True), use_tqdm=False)
    for p, o in zip(ps, outs):
        for c in o.outputs:
            assert c.routing.is_cuda
            _check(model, p, c, 1.0)
