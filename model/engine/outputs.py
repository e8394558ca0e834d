"""What `LLM.generate` returns (vLLM's shapes) and what `LLM.stream` yields."""

from dataclasses import dataclass, field

import torch


@dataclass
class CompletionOutput:
    index: int                          # sample index within the request (0..n-1)
    token_ids: list[int]                # generated tokens (a final EOS / stop token included)
    text: str | None                    # detokenized completion (stop string excluded); None without tokenizer
    token_logprobs: list[float] | None  # log p(token) under softmax(logits / temperature) (logprobs=True)
    finish_reason: str | None           # "stop" (EOS, stop id or stop string) or "length"
    num_preemptions: int = 0
    # return_routing=True: [P + C - 1, moe_layers, top_k] int16 on the model's device, the experts each fed token
    # (the P prompt tokens from the prefill, then the completion but its last, never-fed token) was routed to in
    # each MoE layer — the layout of MoEForCausalLM.forward(routing=) for input ids (prompt + completion)[:-1]
    routing: torch.Tensor | None = None


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return bool(self.outputs) and all(o.finish_reason is not None for o in self.outputs)


@dataclass
class StreamEvent:
    """One new token of one sample; `finish_reason` is set on the sample's last event."""
    request_id: int
    index: int
    token_id: int
    logprob: float | None
    text: str | None                    # the text this token completed (may be "" mid-character); None w/o tokenizer
    finish_reason: str | None
