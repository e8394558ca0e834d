"""Sampler: one token per row of logits, with per-row temperature / top-k / top-p and seeded generators.

Rows with temperature 0 are greedy (argmax). Other rows sample from p = softmax(logits / T) restricted to the
top-k tokens and the smallest top-p nucleus, by inversion: token = first i with cdf[i] > u * cdf[V-1], one
uniform u per row (cdf in float64). Each seeded sample draws its u from its OWN seeded torch.Generator
(SeedStream, on the host, drawn 256 at a time), the other rows from the engine's generator — so a seeded
sample does not depend on what else is in the batch, and no per-row kernel is launched (an earlier version
drew V exponentials per row from per-row device generators: one launch per seeded row per step).
The returned log-prob is that of the sampled token under softmax(logits / T) over the FULL vocabulary
(`full_logprobs`): temperature applied, no top-k / top-p renormalisation, T = 1 for greedy rows — the distribution
the GRPO loss scores a token under (dsmath_kernels.token_logprobs with the same temperature), so the engine's and
the trainer's log-probs are the same quantity. (With top-k / top-p cuts the token was drawn from the renormalised
subset; its log-prob there is log p - log(kept mass).)
"""

import torch

from .sampling_params import SamplingParams


def to_device(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor without a host sync (pinned buffer, non-blocking copy on CUDA)."""
    t = torch.tensor(data, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def full_logprobs(logits: torch.Tensor, inv_temp: torch.Tensor) -> torch.Tensor:
    """logits [B, V] float32, inv_temp [B] (1 / T) -> log softmax(logits * inv_temp) [B, V] over the full vocabulary.
    Multiplies by 1 / T as the GRPO loss's kernels do, so the engine and the trainer round alike."""
    return (logits * inv_temp[:, None]).log_softmax(dim=-1)


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


class Sampler:
    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)   # unseeded rows

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 streams: list[SeedStream | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [B, V] -> (tokens [B] int64, logprobs [B] float32), both on logits.device."""
        logits = logits.float()
        dev = logits.device
        temps = [p.temperature for p in params]
        if all(t == 0.0 for t in temps):
            tokens = logits.argmax(dim=-1)                                     # [B]
            return tokens, logits.log_softmax(dim=-1).gather(-1, tokens[:, None])[:, 0]
        inv_t = to_device([1.0 / t if t > 0 else 1.0 for t in temps], torch.float32, dev)
        full = full_logprobs(logits, inv_t)                                    # [B, V] what the log-probs report
        logp = full                                                            # [B, V] what is sampled from
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            top_k = to_device([p.top_k for p in params], torch.int64, dev)
            top_p = to_device([p.top_p for p in params], torch.float32, dev)
            logp = _mask_top_k_top_p(full, top_k, top_p).log_softmax(dim=-1)
        u = to_device(self._uniforms(streams), torch.float64, dev)             # [B]
        cdf = logp.exp().double().cumsum(dim=-1)                               # [B, V]
        sampled = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
        sampled = torch.where(sampled < logits.shape[-1], sampled, logp.argmax(dim=-1))  # u * total rounded up
        if any(x == 0.0 for x in temps):
            greedy = to_device([x == 0.0 for x in temps], torch.bool, dev)
            sampled = torch.where(greedy, logits.argmax(dim=-1), sampled)     # full uses T = 1 on these rows
        return sampled, full.gather(-1, sampled[:, None])[:, 0]

    def _uniforms(self, streams: list[SeedStream | None]) -> list[float]:
        shared = iter(torch.rand(sum(s is None for s in streams), generator=self.generator,
                                 dtype=torch.float64).tolist())
        return [next(shared) if s is None else s.next() for s in streams]
