"""dsmath's lean MoE model: DeepSeek-V2/V3 (MLA) and Qwen3-MoE on dsmath_kernels, loading HF checkpoints.

    from model import MoEForCausalLM          # after `pip install .`: from dsmath.model import ...
    m = MoEForCausalLM.from_pretrained("DeepSeek-V2-Lite/", dtype=torch.bfloat16, device="cuda")  # local dir
    logits = m(input_ids).logits                       # [B, T, V]; m(ids, return_hidden=True).hidden -> [B, T, H]
    m = MoEForCausalLM.from_preset("v2-lite", dtype=torch.bfloat16, device="cuda")  # random weights, real shapes
    m.save_pretrained("out/")                          # per-expert HF layout: transformers loads it

The engine drives `forward_paged(ForwardMeta, KVCache)` (model/meta.py)."""

from .engine import LLM, SamplingParams  # engine, issue 7
from .meta import ForwardMeta
from .modeling import CausalLMOutput, KVCache, MoEForCausalLM

__all__ = ["LLM", "CausalLMOutput", "ForwardMeta", "KVCache", "MoEForCausalLM", "SamplingParams"]
