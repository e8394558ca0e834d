"""Reference paged-KV attention: the spec of the cache writes, paged decode, MLA decode and paged prefill.

Cache layout (NHD): k_cache [NB, BS, Hkv, D], v_cache [NB, BS, Hkv, Dv]; MLA keeps one latent row per token,
kv_cache [NB, BS, Dc + Dr]. Token p of sequence b lives in block block_tables[b, p // BS] at offset p % BS; a slot
is block * BS + offset. Attention of query head h reads kv head h // (Hq // Hkv) (GQA / MQA):

    out[h] = sum_p softmax_p(scale * q[h] . k[p]) v[p]      over the sequence's cached tokens p

computed in float32 (or float64 if the inputs are float64), returned in q's dtype. A sequence with no tokens
gives zeros. Letters: B batch, N tokens, NB blocks, BS block size, Hq/Hkv query/kv heads, D/Dv head dims,
Dc latent (kv_lora_rank), Dr rope dim.
"""

from __future__ import annotations

import torch


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_slots(slot_mapping, num_slots: int) -> None:
    if slot_mapping.numel() and (int(slot_mapping.min()) < -1 or int(slot_mapping.max()) >= num_slots):
        raise ValueError(f"slot_mapping: values {int(slot_mapping.min())}..{int(slot_mapping.max())}, outside "
                         f"[-1, {num_slots}) (-1 skips a token)")


def cache_write_ref(k, v, k_cache, v_cache, slot_mapping) -> None:
    """k [N, Hkv, D], v [N, Hkv, Dv] -> k_cache/v_cache [NB, BS, Hkv, *] at slot_mapping [N] (-1 = skip), in place.
    Slots outside [-1, NB * BS): ValueError."""
    _check_slots(slot_mapping, k_cache.shape[0] * k_cache.shape[1])
    keep = slot_mapping >= 0  # [N]
    slots = slot_mapping[keep].long()  # [N']
    bs = k_cache.shape[1]
    k_cache[slots // bs, slots % bs] = k[keep].to(k_cache.dtype)
    v_cache[slots // bs, slots % bs] = v[keep].to(v_cache.dtype)


def mla_cache_write_ref(kv, kv_cache, slot_mapping) -> None:
    """kv [N, Dc + Dr] -> kv_cache [NB, BS, Dc + Dr] at slot_mapping [N] (-1 = skip), in place."""
    _check_slots(slot_mapping, kv_cache.shape[0] * kv_cache.shape[1])
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    bs = kv_cache.shape[1]
    kv_cache[slots // bs, slots % bs] = kv[keep].to(kv_cache.dtype)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first seq_len tokens of one sequence as a dense tensor: cache [NB, BS, ...] -> [seq_len, ...].
    Block ids must lie in [0, NB) (never read from the end) and seq_len within the row: else ValueError."""
    bs = cache.shape[1]
    if not 0 <= seq_len <= block_table.shape[0] * bs:
        raise ValueError(f"seq_lens: {seq_len} tokens, outside [0, {block_table.shape[0] * bs}] (block table row of "
                         f"{block_table.shape[0]} blocks of {bs})")
    pos = torch.arange(seq_len, device=cache.device)  # [L]
    blocks = block_table.long()[pos // bs]  # [L]
    if blocks.numel() and (int(blocks.min()) < 0 or int(blocks.max()) >= cache.shape[0]):
        raise ValueError(f"block_tables: ids {int(blocks.min())}..{int(blocks.max())} used, outside the cache's "
                         f"[0, {cache.shape[0]})")
    return cache[blocks, pos % bs]  # [L, ...]


def _attend(q, k, v, scale, mask=None):
    """q [M, Hq, D], k [L, Hkv, D], v [L, Hkv, Dv], mask [M, L] bool (True = attend) -> [M, Hq, Dv] (acc dtype)."""
    M, Hq, _ = q.shape
    L, Hkv, Dv = v.shape
    if L == 0:
        return q.new_zeros(M, Hq, Dv, dtype=_acc_dtype(q))
    acc = _acc_dtype(q)
    g = Hq // Hkv
    k = k.to(acc).repeat_interleave(g, dim=1)  # [L, Hq, D]
    v = v.to(acc).repeat_interleave(g, dim=1)  # [L, Hq, Dv]
    s = torch.einsum("mhd,lhd->hml", q.to(acc), k) * scale  # [Hq, M, L]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with no visible key -> 0
    return torch.einsum("hml,lhd->mhd", p, v)  # [M, Hq, Dv]


def paged_decode_ref(q, k_cache, v_cache, block_tables, seq_lens, scale: float) -> torch.Tensor:
    """q [B, Hq, D], caches [NB, BS, Hkv, D|Dv], block_tables [B, maxb], seq_lens [B] -> [B, Hq, Dv]."""
    B, Hq, _ = q.shape
    out = q.new_zeros(B, Hq, v_cache.shape[-1])
    for b in range(B):
        L = int(seq_lens[b])
        k = gather_kv(k_cache, block_tables[b], L)  # [L, Hkv, D]
        v = gather_kv(v_cache, block_tables[b], L)  # [L, Hkv, Dv]
        out[b] = _attend(q[b : b + 1], k, v, scale)[0].to(q.dtype)
    return out


def mla_decode_ref(q, kv_cache, block_tables, seq_lens, scale: float, v_head_dim: int = 512) -> torch.Tensor:
    """Absorbed MLA decode: q [B, H, Dc + Dr], kv_cache [NB, BS, Dc + Dr] -> [B, H, Dc]; keys are whole latent
    rows, values their first Dc = v_head_dim columns (MQA with one 'kv head')."""
    kv = kv_cache.unsqueeze(2)  # [NB, BS, 1, Dc + Dr]
    return paged_decode_ref(q, kv, kv[..., :v_head_dim], block_tables, seq_lens, scale)


def dequantize_fp8(cache: torch.Tensor, kv_scale: torch.Tensor) -> torch.Tensor:
    """fp8-e4m3 cache [NB, BS, ...] with one scale per token kv_scale [NB, BS] -> float32 values fp8 * scale."""
    s = kv_scale.float().reshape(*kv_scale.shape, *([1] * (cache.dim() - 2)))
    return cache.float() * s


def _attend_lse(q, k, v, scale):
    """q [Hq, D], k [L, Hkv, D], v [L, Hkv, Dv] -> (o [Hq, Dv], lse [Hq]) in the acc dtype; L = 0: (0, -inf)."""
    acc = _acc_dtype(q)
    Hq, L, Hkv = q.shape[0], k.shape[0], k.shape[1]
    if L == 0:
        return q.new_zeros(Hq, v.shape[-1], dtype=acc), q.new_full((Hq,), float("-inf"), dtype=acc)
    g = Hq // Hkv
    s = torch.einsum("hd,lhd->hl", q.to(acc), k.to(acc).repeat_interleave(g, 1)) * scale  # [Hq, L]
    lse = torch.logsumexp(s, -1)  # [Hq]
    return torch.einsum("hl,lhd->hd", torch.exp(s - lse[:, None]), v.to(acc).repeat_interleave(g, 1)), lse


def cascade_decode_ref(q, k_cache, v_cache, block_tables, seq_lens, scale: float, prefix_lens,
                       prefix_rows) -> torch.Tensor:
    """Shared-prefix (cascade) decode, two levels merged by log-sum-exp; equals paged_decode_ref when the prefix
    blocks really are shared. q [B, Hq, D], caches [NB, BS, Hkv, D|Dv]; prefix_lens [B]: sequence b's first
    prefix_lens[b] tokens are read through block_tables[prefix_rows[b]] (its group's table), the rest through
    its own row:
        (o1, lse1) = attend(q[b], prefix),  (o2, lse2) = attend(q[b], own tokens after the prefix)
        out[b] = (e^lse1 o1 + e^lse2 o2) / (e^lse1 + e^lse2)"""
    B, Hq, _ = q.shape
    out = q.new_zeros(B, Hq, v_cache.shape[-1])
    for b in range(B):
        L, P, r = int(seq_lens[b]), int(prefix_lens[b]), int(prefix_rows[b])
        o1, lse1 = _attend_lse(q[b], gather_kv(k_cache, block_tables[r], P), gather_kv(v_cache, block_tables[r], P),
                               scale)
        k2 = gather_kv(k_cache, block_tables[b], L)[P:]
        o2, lse2 = _attend_lse(q[b], k2, gather_kv(v_cache, block_tables[b], L)[P:], scale)
        m = torch.maximum(lse1, lse2)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # both empty: weights 0 -> zeros
        w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)  # [Hq]
        den = (w1 + w2).clamp_min(torch.finfo(w1.dtype).tiny)
        out[b] = ((w1[:, None] * o1 + w2[:, None] * o2) / den[:, None]).to(q.dtype)
    return out


def paged_prefill_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale: float,
                      causal: bool = True) -> torch.Tensor:
    """q [Nq, Hq, D] -> [Nq, Hq, Dv]. The n_b = cu[b+1] - cu[b] queries of sequence b are its LAST n_b tokens,
    at positions L_b - n_b .. L_b - 1 (the cache already holds all L_b = seq_lens[b] tokens). Causal: query at
    position i sees keys at positions <= i; otherwise all L_b keys."""
    out = q.new_zeros(q.shape[0], q.shape[1], v_cache.shape[-1])
    cu = cu_seqlens_q.tolist()
    for b in range(len(cu) - 1):
        q0, q1, L = cu[b], cu[b + 1], int(seq_lens[b])
        if q1 == q0:
            continue
        k = gather_kv(k_cache, block_tables[b], L)
        v = gather_kv(v_cache, block_tables[b], L)
        mask = None
        if causal:
            qpos = torch.arange(L - (q1 - q0), L, device=q.device)  # [n]
            mask = torch.arange(L, device=q.device)[None, :] <= qpos[:, None]  # [n, L]
        out[q0:q1] = _attend(q[q0:q1], k, v, scale, mask).to(q.dtype)
    return out


def mla_prefill_ref(q, kv_cache, block_tables, cu_seqlens_q, seq_lens, scale: float, v_head_dim: int = 512,
                    causal: bool = True) -> torch.Tensor:
    """Absorbed MLA prefill: q [Nq, H, Dc + Dr] against the latent cache -> [Nq, H, Dc] (see paged_prefill_ref)."""
    kv = kv_cache.unsqueeze(2)
    return paged_prefill_ref(q, kv, kv[..., :v_head_dim], block_tables, cu_seqlens_q, seq_lens, scale, causal)


def paginate(seqs: list[torch.Tensor], block_size: int, *, spare_blocks: int = 3, fill: float = float("nan"),
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Test/bench helper, the inverse of gather_kv: scatter dense per-sequence rows seqs[b] [L_b, ...] into a
    paged cache whose blocks are randomly permuted. Unused slots hold `fill` (NaN: a kernel that reads past a
    sequence poisons its output); unused block-table entries hold 2**30 (out of range: reading one is a bug).
    Returns cache [NB, BS, ...] and block_tables [B, max_blocks] int32; build a second cache with the same
    tables via paginate_like."""
    B = len(seqs)
    used = [-(-s.shape[0] // block_size) for s in seqs]
    maxb = max([1, *used])
    nb = sum(used) + spare_blocks
    perm = torch.randperm(nb, generator=generator)
    tables = torch.full((B, maxb), 2**30, dtype=torch.int32)
    at = 0
    for b, u in enumerate(used):
        tables[b, :u] = perm[at : at + u].to(torch.int32)
        at += u
    return paginate_like(seqs, tables, nb, block_size, fill=fill), tables.to(seqs[0].device)


def paginate_like(seqs: list[torch.Tensor], block_tables: torch.Tensor, num_blocks: int, block_size: int, *,
                  fill: float = float("nan")) -> torch.Tensor:
    """Scatter seqs[b] [L_b, ...] into a new cache [num_blocks, block_size, ...] through given block tables."""
    s0 = seqs[0]
    cache = torch.full((num_blocks, block_size, *s0.shape[1:]), fill, dtype=s0.dtype, device=s0.device)
    for b, s in enumerate(seqs):
        pos = torch.arange(s.shape[0], device=s.device)
        blocks = block_tables[b].to(s.device).long()[pos // block_size]
        cache[blocks, pos % block_size] = s
    return cache


def fork_tables(prompt_len: int, seq_lens: list[int], block_size: int, *, spare_blocks: int = 2,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """Test/bench helper: block tables of len(seq_lens) samples forked from one prompt of prompt_len tokens, as
    the engine's block manager leaves them — the prompt's full blocks shared by every sample, the rest (the partial
    last prompt block, copied on write, and each sample's own tokens) private; block ids randomly permuted, unused
    entries 2**30. Returns (block_tables [n, max_blocks] int32, number of blocks); fill a cache with
    paginate_like(rows, block_tables, num_blocks, block_size) where every rows[i] starts with the prompt's rows."""
    full = prompt_len // block_size
    need = [-(-L // block_size) - full for L in seq_lens]
    nb = full + sum(need) + spare_blocks
    perm = torch.randperm(nb, generator=generator).to(torch.int32)
    tables = torch.full((len(seq_lens), max([1, *(full + k for k in need)])), 2**30, dtype=torch.int32)
    at = full
    for i, k in enumerate(need):
        tables[i, :full] = perm[:full]
        tables[i, full:full + k] = perm[at:at + k]
        at += k
    return tables, nb
