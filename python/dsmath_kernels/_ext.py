"""Loading of the compiled module `dsmath_kernels._C` and the glue every op shares: raw pointers, dtype codes,
CUDA streams. The compiled module knows nothing of torch; this file is where tensors become integers."""

from __future__ import annotations

import functools
import os

import torch

# Same table as csrc/include/dsmath/common.h
DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.int32: 3,
    torch.int64: 4,
    torch.float64: 5,
    torch.float8_e4m3fn: 6,  # caches only (attn::kFloat8E4M3)
}


@functools.cache
def C():
    """The compiled module, or None when the package was installed without it (pure-Python fallback)."""
    try:
        from dsmath_kernels import _C  # noqa: PLC0415
    except ImportError:
        return None
    return _C


@functools.cache
def build_info() -> dict:
    c = C()
    if c is None:
        return {"compiled": False, "cuda_compiled": False, "cuda_archs": []}
    info = dict(c.build_info())
    archs = [a for a in str(info.get("cuda_archs", "")).split(",") if a]
    return {"compiled": True, "cuda_compiled": bool(info["cuda_compiled"]), "cuda_archs": archs}


def has_cpu_kernels() -> bool:
    return C() is not None and os.environ.get("DSMATH_FORCE_REFERENCE", "0") != "1"


@functools.cache
def _device_arch_ok(index: int) -> bool:
    """True when the compiled CUDA code can run on GPU `index`. CMake's "90a" is SASS for exactly sm_90;
    a plain "80" also embeds PTX, which the driver JIT-compiles for any newer GPU; "80-real" is SASS only."""
    major, minor = torch.cuda.get_device_capability(index)
    cc = major * 10 + minor
    for a in build_info()["cuda_archs"]:
        base, _, kind = a.partition("-")
        if base.endswith("a"):
            if int(base[:-1]) == cc:
                return True
        elif kind == "real":
            if int(base) // 10 == major and int(base) <= cc:
                return True
        elif int(base) <= cc:
            return True
    return False


def has_cuda_kernels(device: torch.device | None = None) -> bool:
    if not (build_info()["cuda_compiled"] and torch.cuda.is_available()):
        return False
    if os.environ.get("DSMATH_FORCE_REFERENCE", "0") == "1":
        return False
    index = torch.cuda.current_device() if device is None or device.index is None else device.index
    return _device_arch_ok(index)


def cuda_kernels_missing(device: torch.device | None = None) -> str | None:
    """Why the compiled CUDA kernels cannot run on `device` (None when they can). Ignores DSMATH_FORCE_REFERENCE."""
    if C() is None:
        return "the compiled module dsmath_kernels._C is missing"
    if not build_info()["cuda_compiled"]:
        return "the CUDA kernels were not compiled (no nvcc when the package was built)"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    index = torch.cuda.current_device() if device is None or device.index is None else device.index
    if not _device_arch_ok(index):
        major, minor = torch.cuda.get_device_capability(index)
        return (f"the CUDA kernels were compiled for {','.join(build_info()['cuda_archs'])}, not this GPU's "
                f"sm_{major}{minor}")
    return None


# Device-side bounds flags (csrc/include/dsmath/common.h BoundsFlag): bit -> (argument, what was wrong)
BOUNDS_FLAGS = {
    1: ("block_tables", "an entry a sequence uses lies outside [0, num_blocks)"),
    2: ("seq_lens", "a length is negative or beyond what its block-table row holds"),
    4: ("slot_mapping", "a slot lies outside [-1, num_blocks * block_size)"),
    8: ("ids", "an expert id lies outside [0, num_experts)"),
    16: ("max_seqlen_q", "below the longest query run (the queries past it were not computed)"),
}
_FLAGS: dict[int, torch.Tensor] = {}


def bounds_flags(device: torch.device) -> torch.Tensor:
    """The int32 [1] flag word the CUDA kernels of `device` OR their bounds bits into (allocated on first use;
    kernels never sync on it). Read and cleared by raise_device_errors."""
    index = torch.cuda.current_device() if device.index is None else device.index
    t = _FLAGS.get(index)
    if t is None:
        t = _FLAGS[index] = torch.zeros(1, dtype=torch.int32, device=torch.device("cuda", index))
    return t


def flags_message(bits: int) -> str:
    return "; ".join(f"{arg}: {what} (seen on the GPU)" for bit, (arg, what) in BOUNDS_FLAGS.items() if bits & bit)


def raise_device_errors(device=None) -> None:
    """Raise ValueError naming the argument if a CUDA kernel on `device` (default: the current one) met an
    out-of-range block id, sequence length, cache slot or expert id since the last call; clears the flags. Syncs
    the device (call it at the end of a step, or set DSMATH_CHECK_BOUNDS=1 to check after every op)."""
    if not torch.cuda.is_available():
        return
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    index = torch.cuda.current_device() if device.index is None else device.index
    t = _FLAGS.get(index)
    if t is None:
        return
    bits = int(t.item())
    if bits:
        t.zero_()
        raise ValueError(flags_message(bits))


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def stream_of(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream
