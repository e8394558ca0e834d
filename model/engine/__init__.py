"""Generation engine: paged KV cache, continuous batching, chunked prefill, true n-way sampling.

    from model import LLM, SamplingParams      # after `pip install .`: from dsmath.model import ...
    llm = LLM("path/to/checkpoint")            # or LLM(live_model) — used in place
    outs = llm.generate(["1+1="], SamplingParams(n=4, temperature=0.8, max_tokens=64, logprobs=True))

Parts (nano-vllm layout): sequence, block_manager, scheduler, sampler, model_runner, llm_engine; cli for
one-off prompts (`python -m model.engine.cli --model DIR "prompt"`).
"""

from .llm_engine import LLM
from .outputs import CompletionOutput, RequestOutput, StreamEvent
from .sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "StreamEvent"]
