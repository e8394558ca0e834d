"""SamplingParams: how one request is sampled (the vLLM names users know).

temperature=0 is greedy. `n` samples of one prompt share its prefilled KV blocks (see block_manager.py).
`seed` makes a request reproducible whatever else is in the batch: each of its n samples draws from its own
torch.Generator seeded from (seed, sample index).
"""

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                      # -1 (or 0): no top-k cut
    max_tokens: int = 16
    stop: list[str] | str | None = None  # stop strings (need a tokenizer); excluded from .text
    stop_token_ids: list[int] | None = None  # honoured even with ignore_eos
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: bool = False               # return log p(sampled token) under softmax(logits / temperature), full vocab
    return_routing: bool = False         # return the experts each fed token was routed to (CompletionOutput.routing)
    stop_list: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self):
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"SamplingParams.n must be an int >= 1, got {self.n!r}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be -1, 0 or a positive int, got {self.top_k!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not isinstance(self.return_routing, bool):
            raise ValueError(f"SamplingParams.return_routing must be a bool, got {self.return_routing!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"SamplingParams.seed must be an int or None, got {self.seed!r}")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"SamplingParams.stop must be non-empty strings, got {self.stop!r}")
        self.stop_list = stop
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
