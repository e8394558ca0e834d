"""What `LLM.generate` returns (vLLM's shapes) and what `LLM.stream` yields."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Logprob:
    """One token's entry in a log-prob dict: its value, its 1-based rank in that distribution (1 = most likely),
    and its text (None without a tokenizer)."""
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


TokenLogprobs = dict[int, Logprob]   # {token_id: Logprob}: the chosen token first, then the top-k


@dataclass
class CompletionOutput:
    index: int                          # sample index within the request (0..n-1)
    text: str | None                    # detokenized completion (stop string excluded unless
                                        #   include_stop_str_in_output); None without tokenizer or detokenize
    token_ids: list[int]                # generated tokens (a final EOS / stop token included)
    cumulative_logprob: float | None = None   # sum of the sampled tokens' log-probs (when logprobs is not None)
    logprobs: list[TokenLogprobs] | None = None   # one dict per generated token (when logprobs is not None)
    finish_reason: str | None = None    # "stop" (EOS, stop id or stop string), "length", "abort" or "error"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it (None for EOS)
    num_preemptions: int = 0
    # return_routing=True: [P + C - 1, moe_layers, top_k] int16 on the model's device, the experts each fed token
    # (the P prompt tokens from the prefill, then the completion but its last, never-fed token) was routed to in
    # each MoE layer — the layout of MoEForCausalLM.forward(routing=) for input ids (prompt + completion)[:-1]
    routing: torch.Tensor | None = None

    @property
    def token_logprobs(self) -> list[float] | None:
        """The sampled tokens' log-probs as a plain list (what RL code reads), or None."""
        if self.logprobs is None:
            return None
        return [d[t].logprob for t, d in zip(self.token_ids, self.logprobs)]


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # [None, {..}, ...] when prompt_logprobs is set
    error: str | None = None            # why the request could not be served (its outputs say "error")

    @property
    def finished(self) -> bool:
        return bool(self.outputs) and all(o.finish_reason is not None for o in self.outputs)


@dataclass
class StreamEvent:
    """One new token of one sample; `finish_reason` is set on the sample's last event. A request that failed
    yields one event per sample with token_id None, finish_reason "error" and the message in `error`."""
    request_id: int
    index: int
    token_id: int | None
    logprob: float | None               # the token's log-prob (when logprobs is not None)
    text: str | None                    # the text this token completed (may be "" mid-character); None w/o tokenizer
    finish_reason: str | None
    logprobs: TokenLogprobs | None = None   # the token's dict, as in CompletionOutput.logprobs
    stop_reason: int | str | None = None
    error: str | None = None
