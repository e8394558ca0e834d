"""Generation engine: paged KV cache, continuous batching, chunked prefill, true n-way sampling, vLLM's sampling
semantics, chat, and an asyncio front (AsyncLLM) for the server.

    from model import LLM, SamplingParams      # after `pip install .`: from dsmath.model import ...
    llm = LLM("path/to/checkpoint")            # or LLM(live_model) — used in place
    outs = llm.generate(["1+1="], SamplingParams(n=4, temperature=0.8, max_tokens=64, logprobs=0))
    outs = llm.chat([{"role": "user", "content": "1+1?"}], SamplingParams(max_tokens=64))

Parts (nano-vllm layout): sequence, block_manager, scheduler, sampler (+ logits_processors), model_runner,
llm_engine, async_llm; cli for one-off prompts (`python -m model.engine.cli --model DIR "prompt"`).
model/README.md draws the architecture and states the engine–model contract.
"""

from .async_llm import AsyncLLM, EngineClosedError, QueueFullError
from .checks import RequestError
from .llm_engine import LLM
from .outputs import CompletionOutput, Logprob, RequestOutput, StreamEvent
from .sampling_params import SamplingParams

__all__ = ["LLM", "AsyncLLM", "CompletionOutput", "EngineClosedError", "Logprob", "QueueFullError",
           "RequestError", "RequestOutput", "SamplingParams", "StreamEvent"]
