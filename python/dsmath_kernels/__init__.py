"""dsmath_kernels — GPU kernels for DeepSeek-style MoE models and GRPO training, importable into any PyTorch
project: top-k expert routing, grouped GEMM (bf16 and FP8 block-scaled), paged attention, fused GRPO loss. Each op
is a torch custom op (`torch.ops.dsmath.*`) with a plain PyTorch reference in `dsmath_kernels.reference`.
`python -m dsmath_kernels` reports the build and the backend each op will use; `explain(op, *args, **kwargs)` the
backend one call would take and why. A call that cannot take its device's kernel warns once (FallbackWarning);
DSMATH_STRICT=1 makes that an error (FallbackError)."""

__version__ = "0.1.0"

from dsmath_kernels._dispatch import Choice, FallbackError, FallbackWarning, explain  # noqa: E402
from dsmath_kernels._ext import raise_device_errors  # noqa: E402
from dsmath_kernels.attention import (  # noqa: E402
    DecodePlan,
    cache_write,
    mla_cache_write,
    mla_decode,
    mla_prefill,
    paged_decode,
    paged_prefill,
    plan_decode,
)
from dsmath_kernels.cascade import (  # noqa: E402
    SharedPrefix,
    find_shared_prefixes,
    mla_cache_write_fp8,
    quantize_fp8,
    shared_prefix,
)
from dsmath_kernels.cross_entropy import linear_cross_entropy  # noqa: E402
from dsmath_kernels.fp8 import (  # noqa: E402
    dequantize_fp8_blocks,
    fp8_gemm,
    fp8_linear,
    grouped_gemm_fp8,
    moe_experts_fp8,
    quantize_fp8_blocks,
    quantize_fp8_groups,
)
from dsmath_kernels.grpo import group_advantages, grpo_loss, token_logprobs  # noqa: E402
from dsmath_kernels.hf import PatchReport, patch, patch_class, unpatch, unpatch_class  # noqa: E402
from dsmath_kernels.moe import MoePermutation, grouped_gemm, moe_experts, moe_permute  # noqa: E402
from dsmath_kernels.routing import route_topk, route_topk_weights  # noqa: E402

__all__ = [
    "__version__",
    # routing
    "route_topk", "route_topk_weights",
    # MoE experts
    "MoePermutation", "moe_permute", "grouped_gemm", "moe_experts",
    # paged attention
    "DecodePlan", "plan_decode", "cache_write", "mla_cache_write", "paged_decode", "mla_decode", "paged_prefill",
    "mla_prefill",
    # FP8 block-scaled (DeepSeek-V3 checkpoints)
    "quantize_fp8_groups", "quantize_fp8_blocks", "dequantize_fp8_blocks", "fp8_gemm", "fp8_linear",
    "grouped_gemm_fp8", "moe_experts_fp8",
    # shared-prefix (cascade) decode, fp8 MLA cache
    "SharedPrefix", "find_shared_prefixes", "shared_prefix", "quantize_fp8", "mla_cache_write_fp8",
    # GRPO
    "group_advantages", "token_logprobs", "grpo_loss",
    # losses
    "linear_cross_entropy",
    # transformers models (dsmath_kernels.hf; transformers is imported only when a patcher is called)
    "patch", "unpatch", "patch_class", "unpatch_class", "PatchReport",
    # dispatch and bounds
    "explain", "Choice", "FallbackWarning", "FallbackError", "raise_device_errors",
]
