"""Small @triton.jit helpers shared by the Triton kernels (grouped GEMM, GRPO loss)."""

import triton
import triton.language as tl


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b with fp32 accumulation. UPCAST: convert the operands to fp32 first (the Triton interpreter's
    bf16 dot returns garbage); IEEE: exact fp32 products instead of TF32 for fp32 operands."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc
