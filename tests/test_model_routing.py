"""Routing replay in the model: `forward(routing=)` uses exactly the given experts in every MoE layer, with weights
equal to the gating at those experts and gradients reaching the routers; `return_routing` reports the gates' own
top-k; `forward_paged` records each token's experts beside its K/V (`KVCache.routing`), padding rows nowhere."""

import pytest
import torch
import torch.nn.functional as F
from test_model_paged import BS, NB, Seqs
from tiny_models import make_model

from dsmath_kernels.reference import route_topk_weights_ref

FAMILIES = ["tiny-v2", "tiny-v3", "tiny-qwen3"]
pytestmark = pytest.mark.usefixtures("one_thread")


def _capture_experts(model):
    """Hooks recording (x, weights, ids) handed to each MoE layer's experts, in layer order."""
    seen, handles = [], []
    for layer in model.model.layers:
        if layer.is_moe:
            handles.append(layer.mlp.experts.register_forward_hook(lambda m, args, out: seen.append(args)))
    return seen, handles


def _gating_at(gate, x, ids):
    """The model's gating written out: scores of the router logits at `ids`, renormalised and scaled."""
    c = gate.cfg
    logits = F.linear(x.float(), gate.weight.float())
    return route_topk_weights_ref(logits, ids, scoring=c.scoring, renormalize=c.renormalize,
                                  routed_scaling_factor=c.routed_scaling_factor)


@pytest.mark.parametrize("preset", FAMILIES)
def test_replay_uses_exactly_the_given_experts(preset):
    model = make_model(preset)
    L, K, E = model.num_moe_layers, model.config.num_experts_per_tok, model.config.num_experts
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        own = model(ids, return_routing=True)
    assert own.routing.shape == (2, 7, L, K) and own.routing.dtype == torch.int16
    # replaying the model's own choice changes nothing, bit for bit
    with torch.no_grad():
        same = model(ids, routing=own.routing)
    assert torch.equal(same.logits, own.logits)
    # other experts (a random K of E per token and layer): used exactly, with the gating's weights at them
    other = torch.rand(2, 7, L, E).argsort(dim=-1)[..., :K].to(torch.int16)
    seen, handles = _capture_experts(model)
    try:
        out = model(ids, routing=other, return_routing=True)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == L
    moe = [layer.mlp for layer in model.model.layers if layer.is_moe]
    for j, (x, w, used) in enumerate(seen):
        assert torch.equal(used.long(), other[:, :, j].reshape(-1, K).long()), f"layer {j}: other experts ran"
        torch.testing.assert_close(w, _gating_at(moe[j].gate, x, used), atol=1e-6, rtol=1e-5)
    assert not torch.equal(out.logits, own.logits)
    # return_routing under replay: still the gates' own top-k (from the same logits), here != the replayed ids
    assert out.routing.shape == (2, 7, L, K) and not torch.equal(out.routing, other)


@pytest.mark.parametrize("preset", FAMILIES)
def test_replay_gradients_reach_every_router(preset):
    model = make_model(preset).train()
    L, K, E = model.num_moe_layers, model.config.num_experts_per_tok, model.config.num_experts
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    routing = torch.rand(2, 6, L, E).argsort(dim=-1)[..., :K]
    model(ids, routing=routing).logits.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}
    assert len(grads) == L
    for n, g in grads.items():
        assert g is not None and g.abs().sum() > 0, n
    # activation checkpointing: the same gradients under replay
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing = True
    model(ids, routing=routing).logits.square().mean().backward()
    for n, p in model.named_parameters():
        if n in ref:
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-7)


def test_routing_argument_checks():
    model = make_model("tiny-v2")
    ids = torch.zeros(2, 5, dtype=torch.long)
    L, K = model.num_moe_layers, model.config.num_experts_per_tok
    with pytest.raises(ValueError, match="routing.*shape"):
        model(ids, routing=torch.zeros(2, 5, L + 1, K, dtype=torch.int16))
    with pytest.raises(TypeError, match="routing"):
        model(ids, routing=torch.zeros(2, 5, L, K))
    with pytest.raises(ValueError, match="routing.*device"):
        model(ids, routing=torch.zeros(2, 5, L, K, dtype=torch.int16, device="meta"))
    with pytest.raises(ValueError, match="routing.*\\[0, 8\\)"):  # out-of-range experts are refused by name
        model(ids, routing=torch.full((2, 5, L, K), 8, dtype=torch.int16))


@pytest.mark.parametrize("preset", FAMILIES)
def test_forward_paged_records_each_tokens_experts(preset):
    """Prefill two prompts, decode a few tokens: the recorded experts at every written slot are the ones the full
    forward picks for that token (fp32, decisive routing); unwritten slots stay zero, padding goes to the last row."""
    model = make_model(preset)
    L, K = model.num_moe_layers, model.config.num_experts_per_tok
    cache = model.allocate_kv_cache(NB, BS, routing=True)
    assert cache.routing.shape == (NB * BS + 1, L, K) and cache.routing.dtype == torch.int16
    assert model.allocate_kv_cache(NB, BS).routing is None
    assert (model.kv_cache_bytes_per_block(BS, routing=True) - model.kv_cache_bytes_per_block(BS)) == BS * L * K * 2
    gen = torch.Generator().manual_seed(1)
    seqs = Seqs([20, 20], gen)
    prompts = [torch.randint(0, 100, (9,), generator=gen).tolist(), torch.randint(0, 100, (5,), generator=gen).tolist()]
    with torch.no_grad():
        meta, _ = seqs.step(prompts)
        model.forward_paged(meta, cache)
        for _ in range(3):
            meta, _ = seqs.step([[int(torch.randint(0, 100, (1,), generator=gen))] for _ in range(2)])
            model.forward_paged(meta, cache)
        written = set()
        for b, toks in enumerate(seqs.tokens):
            want = model(torch.tensor([toks]), return_routing=True).routing[0]  # [n, L, K]
            slots = [seqs.tables[b][p // BS] * BS + p % BS for p in range(len(toks))]
            written |= set(slots)
            got = cache.routing[slots]
            assert torch.equal(got.sort(-1).values, want.sort(-1).values), f"sequence {b}"
        rest = torch.tensor(sorted(set(range(NB * BS)) - written))
        assert (cache.routing[rest] == 0).all()
        # a padded row (slot -1, as the CUDA-graph decode batches have) writes only the spare last row
        before = cache.routing[:-1].clone()
        meta.slot_mapping = torch.full_like(meta.slot_mapping, -1)
        model.forward_paged(meta, cache)
        assert torch.equal(cache.routing[:-1], before)
