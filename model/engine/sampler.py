"""Sampler: one token per row of logits, with per-row processors, temperature / min-p / top-k / top-p, seeded
generators, and the requested log-probs.

Per row: logits -> logits processors (bad words, min_tokens, logit_bias, penalties: logits_processors.py) ->
times 1/T -> greedy rows take the argmax; the others sample after min-p, top-k and the smallest top-p nucleus,
by inversion: token = first i with cdf[i] > u * cdf[V-1], one uniform u per row (cdf in float64). Each seeded
sample draws its u from its OWN seeded torch.Generator (SeedStream, on the host, drawn 256 at a time), the other
rows from the engine's generator — so a seeded sample does not depend on what else is in the batch, and no
per-row kernel is launched (an earlier version drew V exponentials per row from per-row device generators: one
launch per seeded row per step).

Log-probs are read from the distribution each row's logprobs mode names (sampling_params.py): the raw logits'
log_softmax, or the processed one: log_softmax(processed logits * 1/T) — temperature applied as a multiplication
by 1/T, exactly as the GRPO loss's kernels do, so the engine and the trainer round alike; the FULL vocabulary,
no min-p / top-k / top-p renormalisation; T = 1 for greedy rows; plus the sampled token's rank
and the top-k, for rows that asked. (With cuts the token was drawn from the renormalised subset; its log-prob
there is log p - log(kept mass).)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .logits_processors import RowContext, apply_processors
from .sampling_params import SamplingParams


def to_device(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor without a host sync (pinned buffer, non-blocking copy on CUDA)."""
    t = torch.tensor(data, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t




class SeedStream:
    """The random stream of one seeded sample: a CPU torch.Generator, read in blocks (same values, fewer calls)."""

    def __init__(self, seed: int, block: int = 256):
        self.generator = torch.Generator().manual_seed(seed)
        self.block, self.buf = block, []

    def next(self) -> float:
        if not self.buf:
            self.buf = torch.rand(self.block, generator=self.generator, dtype=torch.float64).tolist()[::-1]
        return self.buf.pop()


def _mask_top_k_top_p(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """scaled [B, V]; top_k [B] int (<=0: off); top_p [B] float. Returns scaled with cut tokens at -inf."""
    V = scaled.shape[-1]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)            # [B, V]
    rank = torch.arange(V, device=scaled.device).expand_as(sorted_logits)  # [B, V]
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)                      # [B]
    drop = rank >= k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs                                  # mass strictly before each token
    drop = before >= top_p[:, None]                                        # keeps at least the top token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)


def _mask_min_p(scaled: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p [B] times the row's largest (the top token always stays)."""
    probs = scaled.softmax(dim=-1)                                          # [B, V]
    keep = probs >= min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return scaled.masked_fill(~keep, float("-inf"))


@dataclass
class SamplerOutput:
    tokens: torch.Tensor                    # [B] int64
    logprobs: torch.Tensor                  # [B] float32: the sampled token's value in its row's mode
    ranks: torch.Tensor | None = None       # [B] int64, 1-based (rows asked for log-probs)
    top_ids: torch.Tensor | None = None     # [B, K] int64, K = the most any row asked for
    top_values: torch.Tensor | None = None  # [B, K] float32

    def to_host(self) -> list[tuple[int, float, int | None, list[int], list[float]]]:
        """Per row (token, value, rank, top ids, top values) in ONE device-to-host transfer."""
        B = self.tokens.shape[0]
        parts = [self.tokens.double(), self.logprobs.double()]
        if self.ranks is not None:
            parts.append(self.ranks.double())
        K = 0 if self.top_ids is None else self.top_ids.shape[1]
        if K:
            parts += [self.top_ids.double().flatten(), self.top_values.double().flatten()]
        flat = torch.cat(parts).tolist()
        toks, vals = flat[:B], flat[B:2 * B]
        ranks = flat[2 * B:3 * B] if self.ranks is not None else [None] * B
        ids, tv = flat[3 * B:3 * B + B * K], flat[3 * B + B * K:]
        return [(int(toks[i]), vals[i], None if ranks[i] is None else int(ranks[i]),
                 [int(t) for t in ids[i * K:(i + 1) * K]], tv[i * K:(i + 1) * K]) for i in range(B)]


class Sampler:
    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)   # unseeded rows

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], streams: list[SeedStream | None],
                 contexts: list[RowContext | None] | None = None, modes: list[str] | None = None) -> SamplerOutput:
        """logits [B, V] -> SamplerOutput on logits.device. `contexts` feed the logits processors (needed for
        rows whose params.needs_context); `modes` are the rows' logprobs modes (default: each params'
        logprobs_mode, else "raw_logprobs")."""
        raw = logits.float()
        x = apply_processors(raw, params, contexts) if contexts is not None else raw   # [B, V]
        greedy = [p.greedy for p in params]
        if all(greedy):
            tokens, proc = x.argmax(dim=-1), x
        else:
            inv_t = to_device([1.0 if g else 1.0 / p.temperature for p, g in zip(params, greedy)], torch.float32,
                              x.device)
            proc = x * inv_t[:, None]                                          # [B, V] processed logits
            tokens = self._draw(self._cut(proc, params, greedy), streams)
            if any(greedy):
                tokens = torch.where(to_device(greedy, torch.bool, x.device), x.argmax(dim=-1), tokens)
        modes = modes or [p.logprobs_mode or "raw_logprobs" for p in params]
        return self._logprobs(raw, proc, tokens, params, modes)

    @staticmethod
    def _cut(proc: torch.Tensor, params: list[SamplingParams], greedy: list[bool]) -> torch.Tensor:
        """What is sampled from: min-p, top-k, top-p on the processed logits (greedy rows: no cuts)."""
        dev, cut = proc.device, proc
        if any(p.min_p > 0 and not g for p, g in zip(params, greedy)):
            cut = _mask_min_p(cut, to_device([0.0 if g else p.min_p for p, g in zip(params, greedy)],
                                             torch.float32, dev))
        if any((p.top_k > 0 or p.top_p < 1.0) and not g for p, g in zip(params, greedy)):
            top_k = to_device([-1 if g else p.top_k for p, g in zip(params, greedy)], torch.int64, dev)
            top_p = to_device([1.0 if g else p.top_p for p, g in zip(params, greedy)], torch.float32, dev)
            cut = _mask_top_k_top_p(cut, top_k, top_p)
        return cut

    def _draw(self, cut: torch.Tensor, streams: list[SeedStream | None]) -> torch.Tensor:
        u = to_device(self._uniforms(streams), torch.float64, cut.device)      # [B]
        cdf = cut.softmax(dim=-1).double().cumsum(dim=-1)                      # [B, V]
        sampled = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
        return torch.where(sampled < cut.shape[-1], sampled, cut.argmax(dim=-1))  # u * total rounded up

    @staticmethod
    def _logprobs(raw: torch.Tensor, proc: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams],
                  modes: list[str]) -> SamplerOutput:
        make = {"raw_logprobs": lambda: raw.log_softmax(dim=-1), "raw_logits": lambda: raw,
                "processed_logprobs": lambda: proc.log_softmax(dim=-1), "processed_logits": lambda: proc}
        src = make[modes[0]]()                                                 # [B, V]
        for mode in set(modes) - {modes[0]}:                                   # rows of other modes
            rows = to_device([m == mode for m in modes], torch.bool, raw.device)
            src = torch.where(rows[:, None], make[mode](), src)
        value = src.gather(-1, tokens[:, None])[:, 0]                          # [B]
        asked = [p.logprobs for p in params if p.logprobs is not None]
        if not asked:
            return SamplerOutput(tokens, value)
        ranks = (src > value[:, None]).sum(dim=-1) + 1                         # [B]
        V = src.shape[-1]
        K = min(V, max(V if k == -1 else k for k in asked))
        if K == 0:
            return SamplerOutput(tokens, value, ranks)
        top_values, top_ids = src.topk(K, dim=-1)                              # [B, K]
        return SamplerOutput(tokens, value, ranks, top_ids, top_values)

    def _uniforms(self, streams: list[SeedStream | None]) -> list[float]:
        shared = iter(torch.rand(sum(s is None for s in streams), generator=self.generator,
                                 dtype=torch.float64).tolist())
        return [next(shared) if s is None else s.next() for s in streams]
