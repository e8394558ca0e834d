"""Paged KV-cache attention for long contexts (up to 128K tokens): cache writes, decode (GQA/MQA), absorbed-MLA
decode, and varlen prefill against the paged cache. Spec: reference/attention.py.

Cache layout (NHD, as FlashAttention / FlashInfer): k_cache [NB, BS, Hkv, D], v_cache [NB, BS, Hkv, Dv];
MLA: kv_cache [NB, BS, Dc + Dr]. block_tables [B, max_blocks] int32, seq_lens [B] int32; token p of sequence b
is at block block_tables[b, p // BS], offset p % BS; slot = block * BS + offset.

Backends: decode and MLA decode run a split-KV (flash-decoding) kernel — CUDA on GPU, C++ threads on CPU, both
using the math of csrc/include/dsmath/attention.h (online softmax, log-sum-exp merge of the splits, 64-bit
offsets). Prefill runs a Triton kernel on GPU; on CPU, torch SDPA per sequence on its gathered KV. Cache
writes: a CUDA kernel on GPU (graph safe), indexing on CPU.

Plan / run: `plan = plan_decode(B, max_seq_len, num_kv_heads=Hkv, num_q_heads=Hq, device=dev)` picks the KV splits
and the tokens per split from host integers only (no device sync, so it is CUDA-graph safe); compute it once per
decode step and pass `plan=` to every layer's paged_decode / mla_decode. Without a plan each call makes one from
block_tables.shape[1] * block_size. A plan never affects correctness (the last split always runs to the end of
the sequence), only the work split.

Decode backend on GPU: DSMATH_DECODE_BACKEND=auto (default: the CUDA kernel) | cuda | triton (tensor-core Triton
split-KV kernel: heads of a kv head / MLA's query heads form the M dim of the MMA) | reference.
MLA decode by default (auto) and every shared-prefix decode (`cascade=`, cascade.py) run the tiled kernels: on GPU
mla_decode_triton.py (all heads of a sequence per KV tile, wgmma), on CPU csrc/attn_cascade_cpu.cpp (64-token x
64-row tiles); DSMATH_DECODE_BACKEND=cuda | triton | cpu still picks the older kernels for plain MLA decode.

Debug bounds checks: set DSMATH_CHECK_BOUNDS=1 (or pass check_bounds=True) and every op verifies — with a host
sync — that seq_lens fit the block tables, that the block ids a sequence uses lie in [0, NB), that slot mappings
lie in [-1, NB * BS), and raises ValueError naming the argument instead of reading/writing out of bounds.

Block size: any 1..256 works. Recommended for the engine: 64 (DEFAULT_BLOCK_SIZE). The kernels look the block
table up per token (an L1-cached int32 read, a shift for power-of-two sizes), so their speed barely depends on the
block size from 16 up; the choice is an allocator trade-off. 64 keeps a 128K-token sequence at 2048 table entries
(8192 at 16) and the block manager's per-step work 4x smaller than at 16, a block of 64 tokens is 256 KiB of K + V
per layer at 8 kv heads x 128 dims (72 KiB for a 576-wide MLA row: FlashMLA's block size), and it wastes < 64
tokens per sequence (< 0.05% at 128K, ~3% of a 2K-token rollout) and at most 63 prompt tokens of prefix sharing
per GRPO group.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsmath_kernels import _ext
from dsmath_kernels import cascade as _cascade
from dsmath_kernels._checks import FLOAT_DTYPES, check_int, check_tensor
from dsmath_kernels._registry import register_backend
from dsmath_kernels.reference.attention import (
    cache_write_ref,
    gather_kv,
    mla_cache_write_ref,
    paged_decode_ref,
    paged_prefill_ref,
)

DEFAULT_BLOCK_SIZE = 64
MAX_BLOCK_SIZE = 256
MAX_SPLITS = 256  # attn::kMaxSplits
BOUNDS_ENV = "DSMATH_CHECK_BOUNDS"
DECODE_BACKEND_ENV = "DSMATH_DECODE_BACKEND"
INT_DTYPES = (torch.int32, torch.int64)


# ---------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class DecodePlan:
    """How decode splits each sequence's KV: `num_splits` ranges of `chunk` tokens (the last runs to the end)."""

    num_splits: int
    chunk: int
    max_seq_len: int


@torch.compiler.assume_constant_result
def _num_workers(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count  # CTAs: ~4 per SM in flight
    return max(1, torch.get_num_threads())


def plan_decode(batch_size: int, max_seq_len: int, *, num_kv_heads: int = 1, num_q_heads: int | None = None,
                device=None, tiled: bool = False) -> DecodePlan:
    """Split plan for one decode step (host integers only: no sync, CUDA-graph safe). Pass the model's head
    counts (MLA: num_kv_heads=1, num_q_heads=H). Work items are (sequence, kv head, head tile, split): enough
    to fill the device, with splits of at least 256 tokens x (G / 4) on GPU (2048 on CPU) so the partial
    results (Hq x Dv floats per split, merged by log-sum-exp) stay a few percent of the KV bytes.
    tiled=True plans for the tiled kernels (MLA decode, cascade decode): head tiles of up to 64 heads, ~2 CTAs
    per SM (165 KB of shared memory each), >= 256-token splits; they size each sequence's splits from its own
    length (only num_splits is used), so a plan for a long context never starves a short one."""
    check_int("batch_size", batch_size, lo=0)
    check_int("max_seq_len", max_seq_len, lo=0)
    check_int("num_kv_heads", num_kv_heads, lo=1)
    G = 1 if num_q_heads is None else check_int("num_q_heads", num_q_heads, lo=num_kv_heads) // num_kv_heads
    device = torch.device(device) if device is not None else torch.device("cpu")
    workers = _num_workers(device)
    if tiled:
        min_chunk = 256
        tiles = -(-G // 64)
        workers = max(1, workers // 2) if device.type == "cuda" else workers
    else:
        min_chunk = 256 * max(1, G // 4) if device.type == "cuda" else 2048
        tiles = -(-G // 4) if device.type == "cuda" else 1  # the C++ kernel runs a whole head group per work item
    items = max(1, batch_size * num_kv_heads * tiles)
    want = max(1, -(-workers // items))
    splits = max(1, min(want, -(-max_seq_len // min_chunk), MAX_SPLITS))
    chunk = max(1, -(-max_seq_len // splits))
    chunk = -(-chunk // 64) * 64  # whole 64-token runs per split
    splits = max(1, -(-max_seq_len // chunk))
    return DecodePlan(splits, chunk, max_seq_len)


# ---------------------------------------------------------------------------------------------- checks
def _want_bounds(check_bounds: bool | None) -> bool:
    if check_bounds is not None:
        return bool(check_bounds)
    return os.environ.get(BOUNDS_ENV, "0") not in ("", "0")


def _check_cache(name: str, cache, ndim: int, device=None) -> None:
    check_tensor(name, cache, ndim=ndim, dtypes=FLOAT_DTYPES + (torch.float64,), device=device)
    if not 1 <= cache.shape[1] <= MAX_BLOCK_SIZE:
        raise ValueError(f"{name}: block size (dim 1) must be in 1..{MAX_BLOCK_SIZE}, got {cache.shape[1]}")
    if cache.stride(-1) != 1:
        raise ValueError(f"{name}: last dim must be contiguous (stride 1), got strides {cache.stride()}")


def _check_gqa_caches(q, k_cache, v_cache) -> tuple[int, int, int]:
    """q [*, Hq, D] against NHD k/v caches [NB, BS, Hkv, D|Dv]; returns (Hq, D, Hkv)."""
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES + (torch.float64,))
    _check_cache("k_cache", k_cache, 4, q.device)
    _check_cache("v_cache", v_cache, 4, q.device)
    Hq, D, Hkv = q.shape[1], q.shape[2], k_cache.shape[2]
    if k_cache.shape[3] != D:
        raise ValueError(f"k_cache: head dim {k_cache.shape[3]} differs from q's {D}")
    if tuple(v_cache.shape[:3]) != tuple(k_cache.shape[:3]):
        raise ValueError(f"v_cache: shape {list(v_cache.shape)} must match k_cache {list(k_cache.shape)} but dim 3")
    if Hq % Hkv:
        raise ValueError(f"q: {Hq} query heads are not a multiple of the cache's {Hkv} kv heads")
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"v_cache: dtype {v_cache.dtype} differs from k_cache {k_cache.dtype}")
    return Hq, D, Hkv


def _check_tables(block_tables, seq_lens, B: int, device) -> None:
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32,), device=device)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,), device=device)
    if block_tables.shape[0] != B:
        raise ValueError(f"block_tables: expected {B} rows (one per sequence), got {block_tables.shape[0]}")
    if seq_lens.shape[0] != B:
        raise ValueError(f"seq_lens: expected shape [{B}], got {list(seq_lens.shape)}")


def _bounds(block_tables, seq_lens, num_blocks: int, block_size: int) -> None:
    """Debug check (host sync): seq_lens in [0, capacity], used block ids in [0, num_blocks)."""
    cap = block_tables.shape[1] * block_size
    sl = seq_lens.long().cpu()
    if (sl < 0).any() or (sl > cap).any():
        b = int(((sl < 0) | (sl > cap)).nonzero()[0])
        raise ValueError(f"seq_lens: sequence {b} has {int(sl[b])} tokens, outside [0, {cap}] "
                         f"(block_tables holds {block_tables.shape[1]} blocks of {block_size})")
    used = (sl + block_size - 1) // block_size  # [B]
    bt = block_tables.long().cpu()
    mask = torch.arange(bt.shape[1])[None, :] < used[:, None]
    bad = mask & ((bt < 0) | (bt >= num_blocks))
    if bad.any():
        b, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"block_tables: entry [{b}, {j}] = {int(bt[b, j])} is outside the cache's "
                         f"{num_blocks} blocks")


def _bounds_slots(slot_mapping, num_slots: int) -> None:
    s = slot_mapping.long().cpu()
    bad = (s < -1) | (s >= num_slots)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"slot_mapping: entry {i} = {int(s[i])} is outside [-1, {num_slots})")


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale: expected a finite float, got {scale!r}")
    return float(scale)


# ---------------------------------------------------------------------------------------------- backends
def _triton_ok() -> bool:
    from dsmath_kernels import attention_triton

    return attention_triton.available()


def _decode_backend(device: torch.device) -> str:
    """cuda (CUDA-core split-KV kernel) by default on GPU; DSMATH_DECODE_BACKEND=triton picks the tensor-core
    Triton kernel (also the fallback when the CUDA kernels are not compiled); =reference forces PyTorch."""
    forced = os.environ.get(DECODE_BACKEND_ENV, "auto")
    if forced not in ("auto", "cuda", "triton", "cpu", "reference"):
        raise ValueError(f"{DECODE_BACKEND_ENV}: expected auto, cuda, triton, cpu or reference, got {forced!r}")
    c = _ext.C()
    if forced == "reference":
        return "reference"
    if device.type == "cuda":
        cuda_ok = _ext.has_cuda_kernels(device) and hasattr(c, "paged_decode_cuda")
        if (forced == "triton" or not cuda_ok) and os.environ.get("DSMATH_FORCE_REFERENCE", "0") != "1" \
                and _triton_ok():
            return "triton"
        return "cuda" if cuda_ok else "reference"
    if device.type == "cpu":
        return "cpu" if _ext.has_cpu_kernels() and hasattr(c, "paged_decode_cpu") else "reference"
    return "reference"


def _write_backend(device: torch.device) -> str:
    if device.type == "cuda" and _ext.has_cuda_kernels(device) and hasattr(_ext.C(), "cache_write_cuda"):
        return "cuda"
    return "reference"


def _prefill_backend(device: torch.device) -> str:
    if device.type == "cuda" and os.environ.get("DSMATH_FORCE_REFERENCE", "0") != "1":
        from dsmath_kernels import attention_triton

        return "triton" if attention_triton.available() else "reference"
    if device.type == "cpu" and os.environ.get("DSMATH_FORCE_REFERENCE", "0") != "1":
        return "cpu-sdpa"
    return "reference"


def _mla_backend(device: torch.device) -> str:
    """MLA decode: the tiled kernels (GPU Triton tensor cores / CPU C++) unless DSMATH_DECODE_BACKEND names one."""
    forced = os.environ.get(DECODE_BACKEND_ENV, "auto")
    if forced != "auto":
        return _decode_backend(device)
    tiled = _cascade._backend(device)
    return {"triton": "triton-tc", "cpu": "cpu-tiled"}.get(tiled, _decode_backend(device))


register_backend("paged_decode", _decode_backend)
register_backend("mla_decode", _mla_backend)
for _op in ("cache_write", "mla_cache_write"):
    register_backend(_op, _write_backend)
for _op in ("paged_prefill", "mla_prefill"):
    register_backend(_op, _prefill_backend)


def _cuda_kernel_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The CUDA decode kernel reads 8-element (16-byte) vectors: head dims and strides multiples of 8, pointers
    16-byte aligned; row widths max(D, Dv) <= 256, or D <= 768 and Dv <= 512 (MLA). Otherwise: reference."""
    for t in (q, k, v):
        if t.shape[-1] % 8 or any(s % 8 for s in t.stride()[:-1]) or t.data_ptr() % 16:
            return False
    D, Dv = k.shape[-1], v.shape[-1]
    return max(D, Dv) <= 256 or (D <= 768 and Dv <= 512)


# ---------------------------------------------------------------------------------------------- cache writes
def _write_rows(src: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
    """CUDA: copy src [N, R...] rows into cache rows (flattened [NB * BS, R...]) at slots; -1 skips."""
    n = src.shape[0]
    if n == 0:
        return
    s = src.to(cache.dtype).reshape(n, -1)
    if s.stride(1) != 1:
        s = s.contiguous()
    slots = slots.contiguous()
    with torch.cuda.device(cache.device):
        _ext.C().cache_write_cuda(_ext.ptr(s), s.stride(0), _ext.ptr(cache), cache.stride(0), cache.stride(1),
                                  cache.shape[1], s.shape[1], _ext.dtype_code(cache), _ext.ptr(slots),
                                  _ext.dtype_code(slots), n, _ext.stream_of(cache))


def _rows_contiguous(cache: torch.Tensor) -> bool:
    """Each token's row (all dims after the first two) is contiguous, so it can be copied as one run."""
    expect = 1
    for size, stride in reversed(list(zip(cache.shape[2:], cache.stride()[2:]))):
        if size > 1 and stride != expect:
            return False
        expect *= size
    return True


@torch.library.custom_op("dsmath::cache_write", mutates_args=("k_cache", "v_cache"))
def _cache_write_op(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    if _write_backend(k.device) == "cuda" and _rows_contiguous(k_cache) and _rows_contiguous(v_cache):
        _write_rows(k, k_cache, slot_mapping)
        _write_rows(v, v_cache, slot_mapping)
    else:
        cache_write_ref(k, v, k_cache, v_cache, slot_mapping)


@_cache_write_op.register_fake
def _(k, v, k_cache, v_cache, slot_mapping):
    return None


@torch.library.custom_op("dsmath::mla_cache_write", mutates_args=("kv_cache",))
def _mla_cache_write_op(kv: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    if _write_backend(kv.device) == "cuda" and _rows_contiguous(kv_cache):
        _write_rows(kv, kv_cache, slot_mapping)
    else:
        mla_cache_write_ref(kv, kv_cache, slot_mapping)


@_mla_cache_write_op.register_fake
def _(kv, kv_cache, slot_mapping):
    return None


def cache_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                slot_mapping: torch.Tensor, *, check_bounds: bool | None = None) -> None:
    """Write new tokens into the paged cache, in place: k [N, Hkv, D] -> k_cache[slot // BS, slot % BS],
    v [N, Hkv, Dv] -> v_cache likewise, slot_mapping [N] int32/int64, -1 = skip. Values cast to the cache dtype."""
    check_tensor("k", k, ndim=3, dtypes=FLOAT_DTYPES + (torch.float64,))
    dev = k.device
    check_tensor("v", v, ndim=3, dtypes=FLOAT_DTYPES + (torch.float64,), device=dev)
    _check_cache("k_cache", k_cache, 4, dev)
    _check_cache("v_cache", v_cache, 4, dev)
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=INT_DTYPES, device=dev)
    N, Hkv, D = k.shape
    if tuple(k_cache.shape[2:]) != (Hkv, D):
        raise ValueError(f"k_cache: expected [NB, BS, {Hkv}, {D}] to match k, got {list(k_cache.shape)}")
    if tuple(v.shape[:2]) != (N, Hkv) or tuple(v_cache.shape[2:]) != (Hkv, v.shape[2]):
        raise ValueError(f"v / v_cache: expected v [{N}, {Hkv}, Dv] and v_cache [NB, BS, {Hkv}, Dv], got "
                         f"{list(v.shape)} and {list(v_cache.shape)}")
    if k_cache.shape[:2] != v_cache.shape[:2]:
        raise ValueError(f"v_cache: blocks {list(v_cache.shape[:2])} differ from k_cache {list(k_cache.shape[:2])}")
    if slot_mapping.shape[0] != N:
        raise ValueError(f"slot_mapping: expected shape [{N}], got {list(slot_mapping.shape)}")
    if _want_bounds(check_bounds):
        _bounds_slots(slot_mapping, k_cache.shape[0] * k_cache.shape[1])
    _cache_write_op(k, v, k_cache, v_cache, slot_mapping)


def mla_cache_write(kv: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, *,
                    check_bounds: bool | None = None) -> None:
    """Write new tokens' latent rows kv [N, Dc + Dr] into kv_cache [NB, BS, Dc + Dr] at slot_mapping [N]
    (-1 = skip), in place."""
    check_tensor("kv", kv, ndim=2, dtypes=FLOAT_DTYPES + (torch.float64,))
    _check_cache("kv_cache", kv_cache, 3, kv.device)
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=INT_DTYPES, device=kv.device)
    if kv.shape[1] != kv_cache.shape[2]:
        raise ValueError(f"kv_cache: row width {kv_cache.shape[2]} differs from kv's {kv.shape[1]}")
    if slot_mapping.shape[0] != kv.shape[0]:
        raise ValueError(f"slot_mapping: expected shape [{kv.shape[0]}], got {list(slot_mapping.shape)}")
    if _want_bounds(check_bounds):
        _bounds_slots(slot_mapping, kv_cache.shape[0] * kv_cache.shape[1])
    _mla_cache_write_op(kv, kv_cache, slot_mapping)


# ---------------------------------------------------------------------------------------------- decode
def _decode_run(q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits, chunk) -> torch.Tensor:
    """q [B, Hq, D], k_cache [NB, BS, Hkv, D], v_cache [NB, BS, Hkv, Dv] (possibly a strided view) -> [B, Hq, Dv]."""
    B, Hq, D = q.shape
    Dv = v_cache.shape[-1]
    backend = _decode_backend(q.device)
    if backend == "cuda" and not _cuda_kernel_ok(q, k_cache, v_cache):
        q = q.clone(memory_format=torch.contiguous_format)  # fresh, contiguous, 16-byte aligned
        if not _cuda_kernel_ok(q, k_cache, v_cache):
            backend = "reference"
    if backend == "reference" or q.dtype == torch.float64 or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype \
            or (backend != "cpu" and B > 65535):  # GPU grids put the batch in gridDim.z
        return paged_decode_ref(q, k_cache, v_cache, block_tables, seq_lens, scale)
    if backend == "triton":
        from dsmath_kernels import attention_triton

        return attention_triton.paged_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits,
                                                    chunk)
    out = torch.empty(B, Hq, Dv, dtype=q.dtype, device=q.device)
    if B == 0 or Hq == 0:
        return out
    if num_splits > 1:
        part_o = torch.empty(B, Hq, num_splits, Dv, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = None
    bt = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    q = q if q.stride(2) == 1 else q.contiguous()
    seq_lens = seq_lens.contiguous()
    args = (_ext.ptr(q), q.stride(0), q.stride(1), _ext.ptr(k_cache), k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2), _ext.ptr(v_cache), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            _ext.ptr(bt), bt.stride(0), _ext.ptr(seq_lens), _ext.ptr(out), _ext.ptr(part_o), _ext.ptr(part_lse),
            _ext.dtype_code(q), B, Hq, k_cache.shape[2], D, Dv, k_cache.shape[1], float(scale), num_splits, chunk)
    if backend == "cuda":
        with torch.cuda.device(q.device):
            _ext.C().paged_decode_cuda(*args, _ext.stream_of(q))
    else:
        _ext.C().paged_decode_cpu(*args, torch.get_num_threads())
    return out


@torch.library.custom_op("dsmath::paged_decode", mutates_args=())
def _paged_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, num_splits: int, chunk: int) -> torch.Tensor:
    return _decode_run(q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits, chunk)


@_paged_decode_op.register_fake
def _(q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits, chunk):
    return q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])


@torch.library.custom_op("dsmath::mla_decode", mutates_args=())
def _mla_decode_op(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                   scale: float, v_head_dim: int, num_splits: int, chunk: int) -> torch.Tensor:
    kv = kv_cache.unsqueeze(2)  # [NB, BS, 1, Dc + Dr]: MQA with one kv head
    return _decode_run(q, kv, kv[..., :v_head_dim], block_tables, seq_lens, scale, num_splits, chunk)


@_mla_decode_op.register_fake
def _(q, kv_cache, block_tables, seq_lens, scale, v_head_dim, num_splits, chunk):
    return q.new_empty(q.shape[0], q.shape[1], v_head_dim)


def _resolve_plan(plan, B: int, block_tables, block_size: int, num_kv_heads: int, num_q_heads: int,
                  device, tiled: bool = False) -> DecodePlan:
    if plan is None:
        return plan_decode(B, block_tables.shape[1] * block_size, num_kv_heads=num_kv_heads,
                           num_q_heads=num_q_heads, device=device, tiled=tiled)
    if not isinstance(plan, DecodePlan):
        raise TypeError(f"plan: expected a DecodePlan from plan_decode(), got {type(plan).__name__}")
    if not (1 <= plan.num_splits <= MAX_SPLITS and plan.chunk >= 1 and (plan.num_splits + 1) * plan.chunk < 2**31):
        raise ValueError(f"plan: num_splits must be in 1..{MAX_SPLITS}, chunk >= 1, (num_splits + 1) * chunk "
                         f"< 2**31; got {plan}")
    return plan


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float, *, plan: DecodePlan | None = None,
                 check_bounds: bool | None = None, cascade=None) -> torch.Tensor:
    """One new token per sequence against the paged cache: q [B, Hq, D], k_cache [NB, BS, Hkv, D],
    v_cache [NB, BS, Hkv, Dv], block_tables [B, maxb] int32, seq_lens [B] int32 -> [B, Hq, Dv] in q's dtype.
    out[b, h] = softmax(scale * q[b, h] . K_b^T) V_b over the seq_lens[b] cached tokens of kv head h // (Hq/Hkv).
    The cache must already hold the new token. seq_lens[b] == 0 gives zeros. cascade: a SharedPrefix
    (dsmath_kernels.shared_prefix) of rows sharing leading blocks; their shared blocks are read once per group."""
    Hq, D, Hkv = _check_gqa_caches(q, k_cache, v_cache)
    B, dev = q.shape[0], q.device
    _check_tables(block_tables, seq_lens, B, dev)
    scale = _check_scale(scale)
    if _want_bounds(check_bounds):
        _bounds(block_tables, seq_lens, k_cache.shape[0], k_cache.shape[1])
    p = _resolve_plan(plan, B, block_tables, k_cache.shape[1], Hkv, Hq, dev, cascade is not None)
    if cascade is not None:
        if k_cache.dtype != q.dtype and q.dtype != torch.float64:
            raise TypeError(f"k_cache: dtype {k_cache.dtype} differs from q's {q.dtype}")
        return _cascade.gqa_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, p.num_splits, cascade,
                                   _want_bounds(check_bounds))
    return _paged_decode_op(q, k_cache, v_cache, block_tables, seq_lens, scale, p.num_splits, p.chunk)


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
               scale: float, *, v_head_dim: int = 512, plan: DecodePlan | None = None,
               check_bounds: bool | None = None, kv_scale: torch.Tensor | None = None,
               cascade=None) -> torch.Tensor:
    """Absorbed DeepSeek MLA decode: q [B, H, Dc + Dr] (q_nope absorbed through W_UK, then q_rope),
    kv_cache [NB, BS, Dc + Dr] (compressed kv, then rope key), Dc = v_head_dim -> [B, H, Dc]:
    softmax(scale * q . row) over whole latent rows, weighted sum of the rows' first Dc columns (apply W_UV after).
    scale is the model's softmax scale (1 / sqrt(qk_nope + qk_rope head dim), times the YaRN mscale^2 if any).
    kv_cache may be float8_e4m3fn with kv_scale [NB, BS] float32 (row = fp8 * scale; cascade.mla_cache_write_fp8).
    cascade: a SharedPrefix (dsmath_kernels.shared_prefix): shared prompt blocks are read once per group."""
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES + (torch.float64,))
    fp8 = kv_cache.dtype == _cascade.FP8 if isinstance(kv_cache, torch.Tensor) else False
    if fp8:
        check_tensor("kv_cache", kv_cache, ndim=3, device=q.device)
        if kv_cache.stride(-1) != 1 or not 1 <= kv_cache.shape[1] <= MAX_BLOCK_SIZE:
            raise ValueError(f"kv_cache: needs a unit last stride and a block size in 1..{MAX_BLOCK_SIZE}")
    else:
        _check_cache("kv_cache", kv_cache, 3, q.device)
    _cascade.check_kv_scale(kv_cache, kv_scale)
    B, _, D = q.shape
    if kv_cache.shape[2] != D:
        raise ValueError(f"kv_cache: row width {kv_cache.shape[2]} differs from q's {D} (Dc + Dr)")
    check_int("v_head_dim", v_head_dim, lo=1, hi=D)
    if kv_cache.dtype != q.dtype and q.dtype != torch.float64 and not fp8:
        raise TypeError(f"kv_cache: dtype {kv_cache.dtype} differs from q's {q.dtype}")
    _check_tables(block_tables, seq_lens, B, q.device)
    scale = _check_scale(scale)
    if _want_bounds(check_bounds):
        _bounds(block_tables, seq_lens, kv_cache.shape[0], kv_cache.shape[1])
    tiled = fp8 or cascade is not None or _mla_backend(q.device) in ("triton-tc", "cpu-tiled")
    p = _resolve_plan(plan, B, block_tables, kv_cache.shape[1], 1, q.shape[1], q.device, tiled)
    if tiled:
        return _cascade.mla_decode(q, kv_cache, block_tables, seq_lens, scale, v_head_dim, p.num_splits, kv_scale,
                                   cascade, _want_bounds(check_bounds))
    return _mla_decode_op(q, kv_cache, block_tables, seq_lens, scale, v_head_dim, p.num_splits, p.chunk)


# ---------------------------------------------------------------------------------------------- prefill
def _prefill_sdpa(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, causal) -> torch.Tensor:
    """CPU path: per sequence, gather its KV and run torch SDPA with a bottom-right causal mask."""
    out = q.new_zeros(q.shape[0], q.shape[1], v_cache.shape[-1])
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    gqa = q.shape[1] != k_cache.shape[2]
    for b in range(len(cu) - 1):
        q0, q1, L = cu[b], cu[b + 1], lens[b]
        n = q1 - q0
        if n == 0 or L == 0:
            continue
        k = gather_kv(k_cache, block_tables[b], L).transpose(0, 1)[None].to(q.dtype)  # [1, Hkv, L, D]
        v = gather_kv(v_cache, block_tables[b], L).transpose(0, 1)[None].to(q.dtype)  # [1, Hkv, L, Dv]
        mask = torch.ones(n, L, dtype=torch.bool, device=q.device).tril(L - n) if causal and n != L else None
        # 4-D inputs: CPU SDPA takes its fused kernel only for [batch, heads, seq, dim]
        o = F.scaled_dot_product_attention(q[q0:q1].transpose(0, 1)[None], k, v, attn_mask=mask,
                                           is_causal=causal and n == L, scale=scale, enable_gqa=gqa)
        out[q0:q1] = o[0].transpose(0, 1)  # [n, Hq, Dv]
    return out


def _prefill_run(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, causal, max_q) -> torch.Tensor:
    backend = _prefill_backend(q.device)
    if backend == "triton" and q.dtype != torch.float64:
        from dsmath_kernels import attention_triton

        return attention_triton.paged_prefill_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens,
                                                     scale, causal, max_q)
    if backend == "cpu-sdpa":
        return _prefill_sdpa(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, causal)
    return paged_prefill_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, causal)


@torch.library.custom_op("dsmath::paged_prefill", mutates_args=())
def _paged_prefill_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float, causal: bool,
                      max_q: int) -> torch.Tensor:
    return _prefill_run(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, causal, max_q)


@_paged_prefill_op.register_fake
def _(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, causal, max_q):
    return q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])


@torch.library.custom_op("dsmath::mla_prefill", mutates_args=())
def _mla_prefill_op(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    seq_lens: torch.Tensor, scale: float, v_head_dim: int, causal: bool, max_q: int) -> torch.Tensor:
    kv = kv_cache.unsqueeze(2)
    return _prefill_run(q, kv, kv[..., :v_head_dim], block_tables, cu_seqlens_q, seq_lens, scale, causal, max_q)


@_mla_prefill_op.register_fake
def _(q, kv_cache, block_tables, cu_seqlens_q, seq_lens, scale, v_head_dim, causal, max_q):
    return q.new_empty(q.shape[0], q.shape[1], v_head_dim)


def _check_prefill(q, block_tables, cu_seqlens_q, seq_lens, block_size, num_blocks, check_bounds, max_seqlen_q):
    """Shared prefill checks; returns the longest query run (host sync only if max_seqlen_q is None)."""
    check_tensor("cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=(torch.int32,), device=q.device)
    B = cu_seqlens_q.shape[0] - 1
    if B < 0:
        raise ValueError("cu_seqlens_q: expected shape [B + 1], got an empty tensor")
    _check_tables(block_tables, seq_lens, B, q.device)
    debug = _want_bounds(check_bounds)
    if debug:
        _bounds(block_tables, seq_lens, num_blocks, block_size)
        cu = cu_seqlens_q.long().cpu()
        n = cu[1:] - cu[:-1]
        if int(cu[0]) != 0 or int(cu[-1]) != q.shape[0] or (n < 0).any():
            raise ValueError(f"cu_seqlens_q: must rise from 0 to Nq = {q.shape[0]}, got {cu.tolist()}")
        if (n > seq_lens.long().cpu()).any():
            b = int((n > seq_lens.long().cpu()).nonzero()[0])
            raise ValueError(f"seq_lens: sequence {b} has {int(seq_lens[b])} tokens but {int(n[b])} queries")
    if max_seqlen_q is None:
        return int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if B > 0 else 0
    return check_int("max_seqlen_q", max_seqlen_q, lo=0)


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float, causal: bool = True, *,
                  max_seqlen_q: int | None = None, check_bounds: bool | None = None) -> torch.Tensor:
    """Varlen prefill against the paged cache: q [Nq, Hq, D] -> [Nq, Hq, Dv]. Sequence b's queries are
    q[cu[b]:cu[b+1]], its LAST n_b = cu[b+1] - cu[b] tokens (positions seq_lens[b] - n_b ..); the cache already
    holds all seq_lens[b] tokens, new ones included (write the cache first). Causal: query at position i sees
    keys at positions <= i. cu_seqlens_q [B + 1] int32; pass max_seqlen_q (max n_b) to avoid a host sync."""
    Hq, D, Hkv = _check_gqa_caches(q, k_cache, v_cache)
    scale = _check_scale(scale)
    max_q = _check_prefill(q, block_tables, cu_seqlens_q, seq_lens, k_cache.shape[1], k_cache.shape[0],
                           check_bounds, max_seqlen_q)
    return _paged_prefill_op(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, bool(causal), max_q)


def mla_prefill(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                seq_lens: torch.Tensor, scale: float, *, v_head_dim: int = 512, causal: bool = True,
                max_seqlen_q: int | None = None, check_bounds: bool | None = None,
                kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Absorbed MLA prefill (chunked prefill / shared prompt blocks): q [Nq, H, Dc + Dr] against kv_cache
    [NB, BS, Dc + Dr] -> [Nq, H, Dc]; MQA with one latent head, values = first Dc = v_head_dim columns. Query
    placement and causality as paged_prefill. kv_cache may be float8_e4m3fn with kv_scale [NB, BS] float32: the
    blocks the tables reference are dequantised to q's dtype first (cascade.dequantized_blocks)."""
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES + (torch.float64,))
    if kv_cache.dtype == _cascade.FP8 if isinstance(kv_cache, torch.Tensor) else False:
        check_tensor("kv_cache", kv_cache, ndim=3, device=q.device)
        _cascade.check_kv_scale(kv_cache, kv_scale)
        check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32, torch.int64), device=q.device)
        kv_cache, block_tables = _cascade.dequantized_blocks(kv_cache, kv_scale, block_tables, q.dtype)
    elif kv_scale is not None:
        _cascade.check_kv_scale(kv_cache, kv_scale)  # refuses scales for a float cache, by name
    _check_cache("kv_cache", kv_cache, 3, q.device)
    if kv_cache.shape[2] != q.shape[2]:
        raise ValueError(f"kv_cache: row width {kv_cache.shape[2]} differs from q's {q.shape[2]} (Dc + Dr)")
    check_int("v_head_dim", v_head_dim, lo=1, hi=q.shape[2])
    scale = _check_scale(scale)
    max_q = _check_prefill(q, block_tables, cu_seqlens_q, seq_lens, kv_cache.shape[1], kv_cache.shape[0],
                           check_bounds, max_seqlen_q)
    return _mla_prefill_op(q, kv_cache, block_tables, cu_seqlens_q, seq_lens, scale, v_head_dim, bool(causal), max_q)
