"""Plain PyTorch references: the specification of every op, readable, with shape comments. Tests use them as the
oracle and benches as the baseline. Letters: T tokens, E experts, K top-k, H hidden, I expert intermediate,
V vocab, B batch, G group size, D head dim."""

from dsmath_kernels.reference.attention import (
    cache_write_ref,
    cascade_decode_ref,
    dequantize_fp8,
    mla_cache_write_ref,
    mla_decode_ref,
    mla_prefill_ref,
    paged_decode_ref,
    paged_prefill_ref,
)
from dsmath_kernels.reference.fp8 import (
    dequantize_blocks_ref,
    dequantize_fp8_groups_ref,
    fp8_gemm_ref,
    grouped_gemm_fp8_ref,
    moe_experts_fp8_ref,
    quantize_blocks_ref,
    quantize_fp8_groups_ref,
)
from dsmath_kernels.reference.grpo import group_advantages_ref, grpo_loss_ref, token_logprobs_ref
from dsmath_kernels.reference.moe import grouped_gemm_ref, moe_experts_ref, moe_permute_ref
from dsmath_kernels.reference.routing import route_topk_ref, route_topk_weights_ref

__all__ = [
    "route_topk_ref", "route_topk_weights_ref",
    "moe_permute_ref", "grouped_gemm_ref", "moe_experts_ref",
    "cache_write_ref", "mla_cache_write_ref", "paged_decode_ref", "mla_decode_ref", "paged_prefill_ref",
    "mla_prefill_ref", "cascade_decode_ref", "dequantize_fp8",
    "quantize_fp8_groups_ref", "dequantize_fp8_groups_ref", "quantize_blocks_ref", "dequantize_blocks_ref",
    "fp8_gemm_ref", "grouped_gemm_fp8_ref", "moe_experts_fp8_ref",
    "group_advantages_ref", "token_logprobs_ref", "grpo_loss_ref",
]
