"""SamplingParams: how one request is sampled — vLLM's names and meanings, so code moves over unchanged.

temperature < 1e-5 is greedy. `n` samples of one prompt share its prefilled KV blocks (see block_manager.py).
`seed` makes a request reproducible whatever else is in the batch: each of its n samples draws from its own
generator seeded from (seed, sample index).

Log-probs (`logprobs: int | None`, as vLLM): None returns none; k >= 0 returns, per generated token, a dict
{token_id: Logprob(logprob, rank, decoded_token)} holding the sampled token and the k most likely tokens (k or
k + 1 entries; -1: the whole vocabulary), plus `cumulative_logprob`. `prompt_logprobs` likewise for the prompt
(the first prompt token has None). Which distribution they describe is the logprobs mode (LLM(logprobs_mode=...)
for the engine, `logprobs_mode=` here for one request):
- "raw_logprobs" (default, as vLLM): log_softmax of the model's logits, before anything below.
- "processed_logprobs": log_softmax of the processed logits over the FULL vocabulary: after bad_words, min_tokens,
  logit_bias and the repetition/frequency/presence penalties, times 1/T (T = 1 for greedy rows) — but BEFORE
  min_p, top-k and top-p: no truncation, no renormalisation. A conscious choice for RL: it is exactly what the
  GRPO loss computes for the token (dsmath_kernels.token_logprobs(..., temperature=T), same 1/T multiplication,
  same rounding), so the trainer's and the engine's log-probs agree whatever top_p the rollout used, and a
  token outside the nucleus still has a finite log-prob. (vLLM V1's processed mode includes the top-k/top-p
  renormalisation; the drawn token's probability under the cut distribution is this value minus log(kept mass).)
- "raw_logits" / "processed_logits": the same two points, as logits instead of log-probs.
Prompt log-probs are always raw (the prompt was not sampled).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .checks import check_bool, check_float, check_int, check_token_ids

LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs", "raw_logits", "processed_logits")
GREEDY_EPS = 1e-5   # temperatures below this are greedy (vLLM's _SAMPLING_EPS)


@dataclass
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0        # subtracted once from tokens already generated, in [-2, 2]
    frequency_penalty: float = 0.0       # subtracted per occurrence in the generated tokens, in [-2, 2]
    repetition_penalty: float = 1.0      # > 1 discourages tokens of the prompt or output (logit / p or * p)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                      # -1 (or 0): no top-k cut
    min_p: float = 0.0                   # drop tokens with p < min_p * p(most likely token)
    seed: int | None = None
    stop: list[str] | str | None = None  # stop strings (need a tokenizer); excluded from .text unless
    stop_token_ids: list[int] | None = None  # include_stop_str_in_output; stop ids are honoured with ignore_eos
    bad_words: list[str] | None = None   # words never generated (their last token is banned after the rest)
    ignore_eos: bool = False
    max_tokens: int | None = 16          # None: up to max_model_len
    min_tokens: int = 0                  # EOS and stop ids/strings cannot end the output before this many tokens
    logprobs: int | None = None          # see the module docstring
    prompt_logprobs: int | None = None
    logprobs_mode: str | None = None     # None: the engine's (LLM(logprobs_mode=...), default "raw_logprobs")
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None   # token id -> added to its logit before sampling
    truncate_prompt_tokens: int | None = None    # keep the last k prompt tokens (-1: max_model_len - 1)
    return_routing: bool = False         # return the experts each fed token was routed to (CompletionOutput.routing)
    stop_list: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self):
        check_int("SamplingParams.n", self.n, 1)
        for name in ("presence_penalty", "frequency_penalty"):
            setattr(self, name, check_float(f"SamplingParams.{name}", getattr(self, name), -2.0, 2.0))
        self.repetition_penalty = check_float("SamplingParams.repetition_penalty", self.repetition_penalty, 0.0,
                                              lo_open=True)
        self.temperature = check_float("SamplingParams.temperature", self.temperature, 0.0)
        self.top_p = check_float("SamplingParams.top_p", self.top_p, 0.0, 1.0, lo_open=True)
        check_int("SamplingParams.top_k", self.top_k, -1)
        self.min_p = check_float("SamplingParams.min_p", self.min_p, 0.0, 1.0)
        check_int("SamplingParams.seed", self.seed, none=True)
        check_int("SamplingParams.max_tokens", self.max_tokens, 1, none=True)
        check_int("SamplingParams.min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"SamplingParams.min_tokens: {self.min_tokens} exceeds max_tokens={self.max_tokens}")
        check_int("SamplingParams.logprobs", self.logprobs, -1, none=True)
        check_int("SamplingParams.prompt_logprobs", self.prompt_logprobs, -1, none=True)
        if self.logprobs_mode is not None and self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"SamplingParams.logprobs_mode: must be one of {LOGPROBS_MODES} or None, "
                             f"got {self.logprobs_mode!r}")
        for name in ("ignore_eos", "detokenize", "skip_special_tokens", "spaces_between_special_tokens",
                     "include_stop_str_in_output", "return_routing"):
            check_bool(f"SamplingParams.{name}", getattr(self, name))
        t = self.truncate_prompt_tokens
        if check_int("SamplingParams.truncate_prompt_tokens", t, -1, none=True) == 0:
            raise ValueError("SamplingParams.truncate_prompt_tokens: must be -1 or >= 1, got 0")
        self.stop_list = _strings("SamplingParams.stop", self.stop)
        self.bad_words = _strings("SamplingParams.bad_words", self.bad_words)
        self.stop_token_ids = check_token_ids("SamplingParams.stop_token_ids", self.stop_token_ids or [])
        self.logit_bias = _logit_bias(self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def needs_context(self) -> bool:
        """Whether sampling reads the sequence's tokens (penalties, bad words, min_tokens) or a bias."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.bad_words or self.min_tokens or self.logit_bias)


def _strings(name: str, v) -> list[str]:
    out = [v] if isinstance(v, str) else v
    if out is None:
        return []
    if not isinstance(out, (list, tuple)) or any(not isinstance(s, str) or not s for s in out):
        raise ValueError(f"{name}: expected a non-empty string or a list of them, got {v!r}")
    return list(out)


def _logit_bias(bias) -> dict[int, float]:
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise TypeError(f"SamplingParams.logit_bias: expected a dict {{token_id: bias}}, got {type(bias).__name__}")
    return {check_int("SamplingParams.logit_bias key", k, 0): check_float(f"SamplingParams.logit_bias[{k}]", v)
            for k, v in bias.items()}
