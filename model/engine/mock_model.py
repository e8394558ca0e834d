"""MockPagedModel: a tiny pure-PyTorch causal LM implementing the model/engine contract, for engine unit tests.

It has what `MoEForCausalLM` offers the engine (config, allocate_kv_cache, kv_cache_bytes_per_block,
forward_paged, and a full-sequence forward) with plain attention over a paged K/V cache gathered per sequence,
so engine tests run in milliseconds and do not depend on the kernels. Its outputs depend on every cached token
(attention with position embeddings), so a wrong block table, slot or copy-on-write shows up as a changed token.
"""

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn


class MockKVCache:
    """One (k, v) pair per layer, each [NB, BS, Hkv, D] — the GQA layout of model.modeling.KVCache."""

    def __init__(self, layers: int, num_blocks: int, block_size: int, heads: int, dim: int, dtype, device):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.data = torch.zeros(2, layers, num_blocks, block_size, heads, dim, dtype=dtype, device=device)
        self.layers = [(self.data[0, i], self.data[1, i]) for i in range(layers)]

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self):
        return len(self.layers)


@dataclass
class _Out:
    logits: torch.Tensor


class MockPagedModel(nn.Module):
    def __init__(self, vocab_size=64, hidden=32, layers=2, heads=2, max_len=512, eos_token_id=None, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.config = SimpleNamespace(vocab_size=vocab_size, num_hidden_layers=layers, eos_token_id=eos_token_id,
                                      max_position_embeddings=max_len, num_key_value_heads=heads)
        self.heads, self.dim = heads, hidden // heads
        self.embed = nn.Parameter(torch.randn(vocab_size, hidden, generator=g))
        self.pos = nn.Parameter(torch.randn(max_len, hidden, generator=g) * 0.5)
        self.qkvo = nn.ParameterList(nn.Parameter(torch.randn(4, hidden, hidden, generator=g) / hidden**0.5)
                                     for _ in range(layers))
        self.head = nn.Parameter(torch.randn(vocab_size, hidden, generator=g) / hidden**0.5 * 4)

    @property
    def device(self):
        return self.embed.device

    @property
    def dtype(self):
        return self.embed.dtype

    def kv_cache_bytes_per_block(self, block_size: int, dtype=None) -> int:
        elem = torch.empty((), dtype=dtype or self.dtype).element_size()
        return 2 * len(self.qkvo) * block_size * self.heads * self.dim * elem

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype=None, device=None) -> MockKVCache:
        return MockKVCache(len(self.qkvo), num_blocks, block_size, self.heads, self.dim,
                           dtype or self.dtype, device or self.device)

    def _split(self, x):  # [..., H] -> [..., h, d]
        return x.view(*x.shape[:-1], self.heads, self.dim)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask=None) -> _Out:
        """input_ids [B, T] -> .logits [B, T, V] (no padding support: equal-length rows)."""
        T = input_ids.shape[1]
        x = self.embed[input_ids] + self.pos[:T]                               # [B, T, H]
        for w in self.qkvo:
            q, k, v = (self._split(x @ w[i]).transpose(1, 2) for i in range(3))  # [B, h, T, d]
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
            x = x + torch.tanh(o @ w[3])
        return _Out(x @ self.head.T)

    @torch.no_grad()
    def forward_paged(self, meta, kv_cache: MockKVCache) -> torch.Tensor:
        x = self.embed[meta.input_ids] + self.pos[meta.positions]              # [N, H]
        bs = kv_cache.block_size
        cu, lens = meta.cu_seqlens_q.tolist(), meta.seq_lens.tolist()
        for w, (kc, vc) in zip(self.qkvo, kv_cache.layers):
            q, k, v = (self._split(x @ w[i]) for i in range(3))                 # [N, h, d]
            keep = meta.slot_mapping >= 0
            kc.view(-1, self.heads, self.dim)[meta.slot_mapping[keep]] = k[keep].to(kc.dtype)
            vc.view(-1, self.heads, self.dim)[meta.slot_mapping[keep]] = v[keep].to(vc.dtype)
            out = torch.empty_like(q)
            for b in range(len(lens)):
                n, L = cu[b + 1] - cu[b], lens[b]
                pos = torch.arange(L, device=x.device)
                slots = meta.block_tables[b, pos // bs].long() * bs + pos % bs  # [L]
                kb = kc.view(-1, self.heads, self.dim)[slots].transpose(0, 1)   # [h, L, d]
                vb = vc.view(-1, self.heads, self.dim)[slots].transpose(0, 1)
                qb = q[cu[b]:cu[b + 1]].transpose(0, 1)                         # [h, n, d]
                mask = pos[None, :] <= (L - n + torch.arange(n, device=x.device))[:, None]  # [n, L]
                ob = F.scaled_dot_product_attention(qb, kb.to(qb.dtype), vb.to(qb.dtype), attn_mask=mask)
                out[cu[b]:cu[b + 1]] = ob.transpose(0, 1)
            x = x + torch.tanh(out.flatten(1) @ w[3])
        return (x[meta.logits_indices] @ self.head.T).float()
