"""dsmath's lean MoE model: DeepSeek-V2/V3 (MLA) and Qwen3-MoE on dsmath_kernels, loading HF checkpoints."""

from model.engine import LLM, SamplingParams  # engine, issue 7
from model.meta import ForwardMeta
from model.modeling import CausalLMOutput, KVCache, MoEForCausalLM

__all__ = ["LLM", "CausalLMOutput", "ForwardMeta", "KVCache", "MoEForCausalLM", "SamplingParams"]
