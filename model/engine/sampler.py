"""Sampler: one token per row of logits, with per-row temperature / top-k / top-p and seeded generators.

Rows with temperature 0 are greedy (argmax). Other rows sample from softmax(logits / T) restricted to the
top-k tokens and the smallest top-p nucleus, by the exponential race: argmax(p / q) with q ~ Exp(1) i.i.d.
is an exact sample of p, and it lets each row draw q from its OWN generator (seeded requests) while the
other rows share the engine's generator — so a seeded sample does not depend on what else is in the batch.
The returned log-prob is that of the sampled token under the distribution it was drawn from (for greedy
rows: the model's own log-softmax, i.e. temperature 1).
"""

import torch

from model.engine.sampling_params import SamplingParams


def to_device(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor without a host sync (pinned buffer, non-blocking copy on CUDA)."""
    t = torch.tensor(data, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


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
    def __init__(self, device: torch.device | str = "cpu", seed: int = 0):
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [B, V] -> (tokens [B] int64, logprobs [B] float32), both on logits.device."""
        logits = logits.float()
        dev = logits.device
        temps = [p.temperature for p in params]
        if all(t == 0.0 for t in temps):
            tokens = logits.argmax(dim=-1)                                     # [B]
            return tokens, logits.log_softmax(dim=-1).gather(-1, tokens[:, None])[:, 0]
        t = to_device([t if t > 0 else 1.0 for t in temps], torch.float32, dev)
        scaled = logits / t[:, None]                                           # [B, V]
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            top_k = to_device([p.top_k for p in params], torch.int64, dev)
            top_p = to_device([p.top_p for p in params], torch.float32, dev)
            scaled = _mask_top_k_top_p(scaled, top_k, top_p)
        logp = scaled.log_softmax(dim=-1)                                      # [B, V]
        q = self._exponential(logp, generators)                                # [B, V]
        sampled = (logp - q.log()).argmax(dim=-1)                              # argmax p / q
        if not any(x == 0.0 for x in temps):
            return sampled, logp.gather(-1, sampled[:, None])[:, 0]
        greedy = to_device([x == 0.0 for x in temps], torch.bool, dev)
        tokens = torch.where(greedy, logits.argmax(dim=-1), sampled)
        logp = torch.where(greedy[:, None], logits.log_softmax(dim=-1), logp)
        return tokens, logp.gather(-1, tokens[:, None])[:, 0]

    def _exponential(self, like: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        q = torch.empty_like(like)
        own = [i for i, g in enumerate(generators) if g is not None]
        if len(own) < len(generators):
            q.exponential_(generator=self.generator)
        for i in own:
            q[i].exponential_(generator=generators[i])
        return q.clamp_min_(1e-30)  # Exp(1) can round to 0; keep log finite
