"""The engine's path over the paged KV cache (`forward_paged` + ForwardMeta) gives the logits of the full-sequence
forward: batched prefill of prompts of different lengths then token-by-token decode (with and without a decode
plan), chunked prefill, a mixed step (one sequence decoding while another prefills), and shared prompt blocks.
Block tables are shuffled, the block size does not divide the lengths. MLA models run absorbed against the latent
cache; GQA models against k/v caches."""

import pytest
import torch
from tiny_models import make_model

import dsmath_kernels as dk
from model import ForwardMeta, MoEForCausalLM

BS = 4          # block size
NB = 48         # blocks in the cache
FAMILIES = ["tiny-v2", "tiny-v3", "tiny-qwen3"]


pytestmark = pytest.mark.usefixtures("one_thread")




class Seqs:
    """Minimal block bookkeeping for the test: each sequence owns a shuffled list of blocks."""

    def __init__(self, lens_cap: list[int], gen: torch.Generator, nb: int = NB):
        perm = torch.randperm(nb, generator=gen).tolist()
        need = [(c + BS - 1) // BS for c in lens_cap]
        self.tables, at = [], 0
        for n in need:
            self.tables.append(perm[at:at + n])
            at += n
        self.tokens: list[list[int]] = [[] for _ in lens_cap]

    def step(self, new: list[list[int]], plan: bool = False) -> ForwardMeta:
        """new[b] = tokens appended to sequence b this step (may be empty -> sequence not in the step)."""
        rows = [b for b, t in enumerate(new) if t]
        ids, pos, slots, cu, lens = [], [], [], [0], []
        for b in rows:
            start = len(self.tokens[b])
            self.tokens[b] += new[b]
            for i, tok in enumerate(new[b]):
                p = start + i
                ids.append(tok)
                pos.append(p)
                slots.append(self.tables[b][p // BS] * BS + p % BS)
            cu.append(cu[-1] + len(new[b]))
            lens.append(len(self.tokens[b]))
        width = max(len(self.tables[b]) for b in rows)
        bt = torch.full((len(rows), width), -1, dtype=torch.int32)
        for r, b in enumerate(rows):
            bt[r, : len(self.tables[b])] = torch.tensor(self.tables[b], dtype=torch.int32)
        is_decode = all(len(new[b]) == 1 for b in rows)
        cu_t = torch.tensor(cu, dtype=torch.int32)
        meta = ForwardMeta(input_ids=torch.tensor(ids), positions=torch.tensor(pos), cu_seqlens_q=cu_t,
                           seq_lens=torch.tensor(lens, dtype=torch.int32), block_tables=bt,
                           slot_mapping=torch.tensor(slots), logits_indices=cu_t[1:].long() - 1, is_decode=is_decode)
        if plan and is_decode:
            meta.decode_plan = dk.plan_decode(len(rows), max(lens), num_kv_heads=1)
        return meta, rows


def full_last_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0, -1]  # [V]


def check(model, seqs: Seqs, logits: torch.Tensor, rows: list[int], what: str) -> None:
    assert logits.dtype == torch.float32 and logits.shape == (len(rows), model.config.vocab_size)
    for r, b in enumerate(rows):
        ref = full_last_logits(model, seqs.tokens[b])
        rel = ((logits[r] - ref).abs().max() / ref.abs().max()).item()
        assert rel <= 1e-4, f"{what}: sequence {b} (length {len(seqs.tokens[b])}): relative error {rel:.3g}"
        assert logits[r].argmax() == ref.argmax(), f"{what}: sequence {b}: argmax differs"


@pytest.mark.parametrize("plan", [False, True])
@pytest.mark.parametrize("preset", FAMILIES)
def test_prefill_then_decode_matches_full_forward(preset, plan):
    model = make_model(preset)
    cache = model.allocate_kv_cache(NB, BS)
    gen = torch.Generator().manual_seed(1)
    V = model.config.vocab_size
    prompts = [torch.randint(0, V, (n,), generator=gen).tolist() for n in (5, 9, 1)]
    seqs = Seqs([len(p) + 6 for p in prompts], gen)
    meta, rows = seqs.step(prompts)
    assert not meta.is_decode
    logits = model.forward_paged(meta, cache)
    check(model, seqs, logits, rows, f"{preset} prefill")
    for step in range(5):
        nxt = [[int(t)] for t in logits.argmax(-1)]
        meta, rows = seqs.step(nxt, plan=plan)
        assert meta.is_decode
        logits = model.forward_paged(meta, cache)
        check(model, seqs, logits, rows, f"{preset} decode step {step}")


@pytest.mark.parametrize("preset", FAMILIES)
def test_chunked_prefill_and_mixed_step(preset):
    """Sequence 0 prefills in chunks of 6, 1, 5 tokens while sequence 1 (prefilled first) decodes alongside."""
    model = make_model(preset)
    cache = model.allocate_kv_cache(NB, BS)
    gen = torch.Generator().manual_seed(2)
    V = model.config.vocab_size
    a = torch.randint(0, V, (12,), generator=gen).tolist()
    b = torch.randint(0, V, (7,), generator=gen).tolist()
    seqs = Seqs([16, 12], gen)
    meta, rows = seqs.step([a[:6], b])
    check(model, seqs, model.forward_paged(meta, cache), rows, f"{preset} chunk 1")
    for lo, hi in ((6, 7), (7, 12)):
        meta, rows = seqs.step([a[lo:hi], [int(torch.randint(0, V, (1,), generator=gen))]])
        assert not meta.is_decode or hi - lo == 1
        check(model, seqs, model.forward_paged(meta, cache), rows, f"{preset} chunk {lo}:{hi} + decode")


@pytest.mark.parametrize("preset", ["tiny-v2", "tiny-qwen3"])
def test_shared_prompt_blocks(preset):
    """Two sequences share the full blocks of a common 8-token prefix; the second only prefills its suffix."""
    model = make_model(preset)
    cache = model.allocate_kv_cache(NB, BS)
    gen = torch.Generator().manual_seed(3)
    V = model.config.vocab_size
    prefix = torch.randint(0, V, (8,), generator=gen).tolist()
    seqs = Seqs([12, 12], gen)
    seqs.tables[1][:2] = seqs.tables[0][:2]  # the prefix's two full blocks
    meta, rows = seqs.step([prefix + [5], []])
    check(model, seqs, model.forward_paged(meta, cache), rows, f"{preset} first sequence")
    seqs.tokens[1] = list(prefix)  # already cached through the shared blocks
    meta, rows = seqs.step([[], [7, 9, 11]])
    check(model, seqs, model.forward_paged(meta, cache), rows, f"{preset} suffix over shared blocks")


def test_cache_shapes_and_bytes():
    for preset in FAMILIES:
        m = make_model(preset)
        c = m.config
        cache = m.allocate_kv_cache(3, 16)
        if c.is_mla:
            assert cache[0].shape == (3, 16, c.kv_lora_rank + c.qk_rope_head_dim)
            per_tok = c.kv_lora_rank + c.qk_rope_head_dim
        else:
            k, v = cache[0]
            assert k.shape == v.shape == (3, 16, c.num_key_value_heads, c.head_dim)
            per_tok = 2 * c.num_key_value_heads * c.head_dim
        assert len(cache) == c.num_hidden_layers
        assert m.kv_cache_bytes_per_block(16) == c.num_hidden_layers * 16 * per_tok * 4
        assert m.kv_cache_bytes_per_block(16, torch.bfloat16) == c.num_hidden_layers * 16 * per_tok * 2
        assert cache.data.numel() * 4 == 3 * m.kv_cache_bytes_per_block(16)



def paged_vs_full(model, ref, device, steps: int = 3, prompt_lens=(37, 5, 130)) -> tuple[float, float]:
    """Batched prefill then `steps` decode steps of `model` through the paged cache on `device`. Returns the worst
    relative errors of (paged logits, full-forward logits of `model`) against the full forward of `ref` (the same
    weights in float32): the paged path must be about as accurate as the full forward in the same dtype."""
    gen = torch.Generator().manual_seed(4)
    V = model.config.vocab_size
    prompts = [torch.randint(0, V, (n,), generator=gen).tolist() for n in prompt_lens]
    nb = sum((n + steps + BS) // BS for n in prompt_lens) + 8
    seqs = Seqs([n + steps + 1 for n in prompt_lens], gen, nb=nb)
    cache = model.allocate_kv_cache(nb, BS, device=device)
    worst_paged = worst_full = 0.0
    new = prompts
    for step in range(steps + 1):
        meta, rows = seqs.step(new, plan=step > 0)
        meta = ForwardMeta(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in vars(meta).items()})
        logits = model.forward_paged(meta, cache)
        with torch.no_grad():
            for r, b in enumerate(rows):
                ids = torch.tensor([seqs.tokens[b]], device=device)
                want = ref(ids).logits[0, -1].float()
                full = model(ids).logits[0, -1].float()
                scale = want.abs().max()
                worst_paged = max(worst_paged, ((logits[r] - want).abs().max() / scale).item())
                worst_full = max(worst_full, ((full - want).abs().max() / scale).item())
        new = [[int(t)] for t in logits.argmax(-1).cpu()]
    return worst_paged, worst_full


def bf16_copy(model):
    import copy
    return copy.deepcopy(model).cast(torch.bfloat16).eval()


@pytest.mark.gpu
@pytest.mark.parametrize("preset", FAMILIES)
def test_gpu_paged_bf16_as_accurate_as_full_forward(preset):
    ref = make_model(preset).to("cuda")
    paged, full = paged_vs_full(bf16_copy(ref), ref, torch.device("cuda"))
    assert paged <= 2 * full + 1e-2, f"paged bf16 error {paged:.3g} vs full-forward bf16 error {full:.3g}"


@pytest.mark.gpu
def test_gpu_v2_lite_shapes_two_layers():
    """DeepSeek-V2-Lite's real widths (16 heads, Dc 512, Dr 64, 64 experts top-6, vocab 102400), two layers:
    the paged kernels at real shapes are as accurate as the full forward, and forward+backward runs in bf16."""
    from model.presets import preset as get
    torch.manual_seed(0)
    ref = MoEForCausalLM.from_config(get("v2-lite", num_hidden_layers=2), device="cuda").eval()
    model = bf16_copy(ref)
    paged, full = paged_vs_full(model, ref, torch.device("cuda"), steps=2, prompt_lens=(300, 17))
    assert paged <= 2 * full + 1e-2, f"paged bf16 error {paged:.3g} vs full-forward bf16 error {full:.3g}"
    del ref
    model.train()
    ids = torch.randint(0, 102400, (2, 512), device="cuda")
    model(ids).logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
