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

Bounds: a bad block id, length or slot never reads or writes out of bounds. On CPU every call checks (vectorised,
no cost worth naming) that seq_lens lie in [0, max_blocks * BS], that the block ids a sequence uses lie in
[0, NB), that slots lie in [-1, NB * BS) and that cu_seqlens_q rises from 0 to Nq with n_b <= seq_lens[b], and
raises ValueError naming the argument. On CUDA the kernels (CUDA C++ and Triton, the tiled MLA / cascade decode
of mla_decode_triton.py included) guard every block-table read and slot: an id outside [0, NB) or a length beyond
the table is read as empty (never out of bounds) and sets a device-side flag, with no host sync;
DSMATH_CHECK_BOUNDS=1 (or check_bounds=True) reads the flag after the call and raises the same ValueError, and
`dsmath_kernels.raise_device_errors()` checks it on demand (say once per step).
max_seqlen_q (prefill) must be >= every sequence's query count: on GPU it sizes the grid, and a sequence with more
queries leaves its rows past it unwritten and sets the device flag; in debug mode (DSMATH_CHECK_BOUNDS=1) and on
CPU a value below the true maximum raises ValueError before anything runs.

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

from dsmath_kernels import _dispatch, _ext
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
    if num_q_heads is not None and check_int("num_q_heads", num_q_heads, lo=num_kv_heads) % num_kv_heads:
        raise ValueError(f"num_q_heads: {num_q_heads} is not a multiple of num_kv_heads = {num_kv_heads}")
    G = 1 if num_q_heads is None else num_q_heads // num_kv_heads
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
    if any(n == 0 for n in cache.shape[2:]):
        raise ValueError(f"{name}: heads and head dims must be >= 1, got shape {list(cache.shape)}")
    if cache.stride(-1) != 1:
        raise ValueError(f"{name}: last dim must be contiguous (stride 1), got strides {cache.stride()}")
    if any(st == 0 and n > 1 for n, st in zip(cache.shape, cache.stride())):
        raise ValueError(f"{name}: an expanded (stride-0) view, got strides {cache.stride()} for shape "
                         f"{list(cache.shape)}; slots would alias (pass a real tensor)")


def _check_gqa_caches(q, k_cache, v_cache) -> tuple[int, int, int]:
    """q [*, Hq, D] against NHD k/v caches [NB, BS, Hkv, D|Dv]; returns (Hq, D, Hkv)."""
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES + (torch.float64,))
    _check_cache("k_cache", k_cache, 4, q.device)
    _check_cache("v_cache", v_cache, 4, q.device)
    Hq, D, Hkv = q.shape[1], q.shape[2], k_cache.shape[2]
    if Hq == 0 or D == 0:
        raise ValueError(f"q: expected at least one head of at least one dim, got shape {list(q.shape)}")
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
    """seq_lens in [0, capacity], used block ids in [0, num_blocks); ValueError naming the argument. Vectorised;
    a host sync for device tensors (CPU calls run it always, CUDA ones in debug mode or after a flag)."""
    cap = block_tables.shape[1] * block_size
    sl = seq_lens.long().cpu()
    if sl.numel() and (int(sl.min()) < 0 or int(sl.max()) > cap):
        b = int(((sl < 0) | (sl > cap)).nonzero()[0])
        raise ValueError(f"seq_lens: sequence {b} has {int(sl[b])} tokens, outside [0, {cap}] "
                         f"(block_tables holds {block_tables.shape[1]} blocks of {block_size})")
    bt = block_tables.cpu()
    if bt.numel() == 0 or (int(bt.min()) >= 0 and int(bt.max()) < num_blocks):
        return  # every entry in range (the common case: no mask needed)
    used = (sl + block_size - 1) // block_size  # [B]
    mask = torch.arange(bt.shape[1])[None, :] < used[:, None]
    bad = mask & ((bt < 0) | (bt >= num_blocks))
    if bad.any():
        b, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"block_tables: entry [{b}, {j}] = {int(bt[b, j])} is outside the cache's "
                         f"{num_blocks} blocks")


def _bounds_slots(slot_mapping, num_slots: int) -> None:
    s = slot_mapping.cpu()
    if s.numel() == 0 or (int(s.min()) >= -1 and int(s.max()) < num_slots):
        return
    bad = (s < -1) | (s >= num_slots)
    i = int(bad.nonzero()[0])
    raise ValueError(f"slot_mapping: entry {i} = {int(s[i])} is outside [-1, {num_slots}) (-1 skips a token)")


def _flags_before(device: torch.device, debug: bool) -> None:
    """CUDA, debug mode: clear the device's bounds flags so the check after the call sees this call's bits only."""
    if debug:
        _ext.bounds_flags(device).zero_()


def _flags_after(device: torch.device, debug: bool, detail) -> None:
    """CUDA, debug mode: read the kernels' bounds flag (a sync) and raise ValueError naming the argument; `detail()`
    re-checks on the host first for a message with the exact entry."""
    if not debug:
        return
    try:
        _ext.raise_device_errors(device)
    except ValueError:
        detail()
        raise


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale: expected a finite float, got {scale!r}")
    return float(scale)


# ---------------------------------------------------------------------------------------------- backends
def _triton_ok() -> bool:
    from dsmath_kernels import attention_triton

    return attention_triton.available()


def _cuda_layout_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the CUDA decode kernel cannot read these tensors (None: it can). It loads 8-element (16-byte) vectors:
    head dims and strides multiples of 8, 16-byte aligned pointers (q is copied when only q is off); row widths
    max(D, Dv) <= 256, or D <= 768 and Dv <= 512 (MLA)."""
    D, Dv = k.shape[-1], v.shape[-1]
    if D % 8 or Dv % 8:
        return f"head dims D = {D}, Dv = {Dv} are not multiples of 8"
    if not (max(D, Dv) <= 256 or (D <= 768 and Dv <= 512)):
        return f"head dims D = {D}, Dv = {Dv} exceed the kernel's (<= 256, or MLA's 768 / 512)"
    for name, t in (("k_cache", k), ("v_cache", v)):
        if any(st % 8 for st in t.stride()[:-1]):
            return f"{name} strides {t.stride()} are not multiples of 8 elements"
        if t.data_ptr() % 16:
            return f"{name} data pointer is not 16-byte aligned (a view at an odd offset)"
    return None


def _choose_decode(op: str, device: torch.device, dtype: torch.dtype, cache_dtype: torch.dtype,
                   layout: str | None = None) -> _dispatch.Choice:
    """Decode backend: on GPU the CUDA kernel (DSMATH_DECODE_BACKEND=triton: the tensor-core Triton kernel), the
    Triton kernel when the CUDA one cannot take the call (`layout`: why, from _cuda_layout_problem); on CPU the C++
    kernel; float64 runs the reference by design."""
    forced = _dispatch.forced(op)
    if forced:
        return forced
    env = os.environ.get(DECODE_BACKEND_ENV, "auto")
    if env not in ("auto", "cuda", "triton", "cpu", "reference"):
        raise ValueError(f"{DECODE_BACKEND_ENV}: expected auto, cuda, triton, cpu or reference, got {env!r}")
    if env == "reference":
        return _dispatch.by_design(op, "reference", f"{DECODE_BACKEND_ENV}=reference")
    if dtype == torch.float64:
        return _dispatch.by_design(op, "reference", "float64 runs the reference (the kernels take fp32/fp16/bf16)")
    if cache_dtype != dtype:
        return _dispatch.fallback(op, "reference", f"q is {dtype} but the cache is {cache_dtype}",
                                  "pass q in the cache's dtype")
    if device.type != "cuda":
        return _dispatch.device_kernel(op, device, cuda=False)
    triton = _triton_ok()
    if env == "triton":
        if triton:
            return _dispatch.by_design(op, "triton", f"{DECODE_BACKEND_ENV}=triton")
        return _dispatch.no_triton(op, "reference")
    base = _dispatch.device_kernel(op, device)
    if base.fallback:
        return _dispatch.fallback(op, "triton" if triton else "reference", base.reason, base.fix)
    if layout is not None:
        return _dispatch.fallback(op, "triton" if triton else "reference", layout,
                                  "keep the cache contiguous per token row and 16-byte aligned, head dims multiples "
                                  "of 8")
    return base


def _decode_backend(device: torch.device) -> str:
    """Registry entry (`python -m dsmath_kernels`): the backend of a default-shaped bf16 call on `device`."""
    return _choose_decode("paged_decode", device, torch.bfloat16, torch.bfloat16).backend


def _choose_write(op: str, device: torch.device, caches=()) -> _dispatch.Choice:
    forced = _dispatch.forced(op)
    if forced:
        return forced
    if device.type != "cuda":
        return _dispatch.by_design(op, "torch", "CPU design: an indexed copy")
    base = _dispatch.device_kernel(op, device)
    if base.fallback:
        return base
    for name, c in caches:
        if not _rows_contiguous(c):
            return _dispatch.fallback(op, "reference", f"{name} rows are not contiguous (strides {c.stride()})",
                                      "allocate the cache with each token's row contiguous")
    return base


def _write_backend(device: torch.device) -> str:
    return _choose_write("cache_write", device).backend


def _choose_prefill(op: str, device: torch.device, dtype: torch.dtype, cache_dtype: torch.dtype) -> _dispatch.Choice:
    forced = _dispatch.forced(op)
    if forced:
        return forced
    if device.type == "cpu":
        return _dispatch.by_design(op, "cpu-sdpa", "CPU design: torch SDPA per sequence on its gathered KV")
    if dtype == torch.float64:
        return _dispatch.by_design(op, "reference", "float64 runs the reference (the kernel takes fp32/fp16/bf16)")
    if device.type != "cuda":
        return _dispatch.no_device_kernel(op, device, "reference")
    if not _triton_ok():
        return _dispatch.no_triton(op, "reference")
    if cache_dtype != dtype:
        return _dispatch.fallback(op, "reference", f"q is {dtype} but the cache is {cache_dtype}",
                                  "pass q in the cache's dtype")
    return _dispatch.kernel(op, "triton")


def _prefill_backend(device: torch.device) -> str:
    return _choose_prefill("paged_prefill", device, torch.bfloat16, torch.bfloat16).backend


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


# ---------------------------------------------------------------------------------------------- cache writes
def _write_rows(src: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
    """CUDA: copy src [N, R...] rows into cache rows (flattened [NB * BS, R...]) at slots; -1 skips, a slot outside
    [-1, NB * BS) is skipped and flagged (dsmath_kernels.raise_device_errors)."""
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
                                  _ext.dtype_code(slots), n, cache.shape[0] * cache.shape[1],
                                  _ext.ptr(_ext.bounds_flags(cache.device)), _ext.stream_of(cache))


def _rows_contiguous(cache: torch.Tensor) -> bool:
    """Each token's row (all dims after the first two) is contiguous, so it can be copied as one run."""
    expect = 1
    for size, stride in reversed(list(zip(cache.shape[2:], cache.stride()[2:]))):
        if size > 1 and stride != expect:
            return False
        expect *= size
    return True


def _write(op: str, pairs, slot_mapping: torch.Tensor, debug: bool, ref) -> None:
    """pairs: [(src [N, ...], cache [NB, BS, ...], name)]; ref: the reference write (the CPU path). Slots are
    checked on CPU always (the indexed copy would wrap negative ones), on CUDA by the kernel."""
    cache0 = pairs[0][1]
    num_slots = cache0.shape[0] * cache0.shape[1]
    choice = _dispatch.take(_choose_write(op, cache0.device, [(name, c) for _, c, name in pairs]))
    if choice.backend == "cuda":
        _flags_before(cache0.device, debug)
        for src, cache, _ in pairs:
            _write_rows(src, cache, slot_mapping)
        _flags_after(cache0.device, debug, lambda: _bounds_slots(slot_mapping, num_slots))
        return
    _bounds_slots(slot_mapping, num_slots)
    ref(*[p[0] for p in pairs], *[p[1] for p in pairs], slot_mapping)


@torch.library.custom_op("dsmath::cache_write", mutates_args=("k_cache", "v_cache"))
def _cache_write_op(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, debug: bool = False) -> None:
    _write("cache_write", [(k, k_cache, "k_cache"), (v, v_cache, "v_cache")], slot_mapping, debug, cache_write_ref)


@_cache_write_op.register_fake
def _(k, v, k_cache, v_cache, slot_mapping, debug=False):
    return None


@torch.library.custom_op("dsmath::mla_cache_write", mutates_args=("kv_cache",))
def _mla_cache_write_op(kv: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                        debug: bool = False) -> None:
    _write("mla_cache_write", [(kv, kv_cache, "kv_cache")], slot_mapping, debug, mla_cache_write_ref)


@_mla_cache_write_op.register_fake
def _(kv, kv_cache, slot_mapping, debug=False):
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
    _cache_write_op(k, v, k_cache, v_cache, slot_mapping, _want_bounds(check_bounds))


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
    _mla_cache_write_op(kv, kv_cache, slot_mapping, _want_bounds(check_bounds))


# ---------------------------------------------------------------------------------------------- decode
def _decode_run(op, q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits, chunk,
                debug=False) -> torch.Tensor:
    """q [B, Hq, D], k_cache [NB, BS, Hkv, D], v_cache [NB, BS, Hkv, Dv] (possibly a strided view) -> [B, Hq, Dv]."""
    B, Hq, D = q.shape
    Dv = v_cache.shape[-1]
    NB, BS = k_cache.shape[0], k_cache.shape[1]
    layout = None
    if q.device.type == "cuda":
        if q.stride(-1) != 1 or any(st % 8 for st in q.stride()[:-1]) or q.data_ptr() % 16:
            q = q.clone(memory_format=torch.contiguous_format)  # fresh, contiguous, 16-byte aligned
        layout = _cuda_layout_problem(q, k_cache, v_cache)
    choice = _dispatch.take(_choose_decode(op, q.device, q.dtype, k_cache.dtype, layout))
    backend = choice.backend
    if backend == "reference" or q.device.type == "cpu":
        _bounds(block_tables, seq_lens, NB, BS)  # CPU: always (vectorised); the reference path syncs anyway
    if backend == "reference":
        return paged_decode_ref(q, k_cache, v_cache, block_tables, seq_lens, scale)
    if backend == "triton":
        from dsmath_kernels import attention_triton

        _flags_before(q.device, debug)
        out = attention_triton.paged_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits,
                                                   chunk, _ext.bounds_flags(q.device))
        _flags_after(q.device, debug, lambda: _bounds(block_tables, seq_lens, NB, BS))
        return out
    out = torch.empty(B, Hq, Dv, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    if num_splits > 1:
        part_o = torch.empty(B, Hq, num_splits, Dv, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = None
    bt = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    q = q if q.stride(2) == 1 else q.contiguous()
    seq_lens = seq_lens.contiguous()
    flags = _ext.bounds_flags(q.device) if backend == "cuda" else None
    args = (_ext.ptr(q), q.stride(0), q.stride(1), _ext.ptr(k_cache), k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2), _ext.ptr(v_cache), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            _ext.ptr(bt), bt.stride(0), _ext.ptr(seq_lens), _ext.ptr(out), _ext.ptr(part_o), _ext.ptr(part_lse),
            _ext.dtype_code(q), B, Hq, k_cache.shape[2], D, Dv, BS, float(scale), num_splits, chunk, bt.shape[1], NB,
            _ext.ptr(flags))
    if backend == "cuda":
        _flags_before(q.device, debug)
        with torch.cuda.device(q.device):
            _ext.C().paged_decode_cuda(*args, _ext.stream_of(q))
        _flags_after(q.device, debug, lambda: _bounds(block_tables, seq_lens, NB, BS))
    else:
        _ext.C().paged_decode_cpu(*args, torch.get_num_threads())
    return out


@torch.library.custom_op("dsmath::paged_decode", mutates_args=())
def _paged_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, num_splits: int, chunk: int,
                     debug: bool = False) -> torch.Tensor:
    return _decode_run("paged_decode", q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits, chunk, debug)


@_paged_decode_op.register_fake
def _(q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits, chunk, debug=False):
    return q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])


@torch.library.custom_op("dsmath::mla_decode", mutates_args=())
def _mla_decode_op(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                   scale: float, v_head_dim: int, num_splits: int, chunk: int, debug: bool = False) -> torch.Tensor:
    kv = kv_cache.unsqueeze(2)  # [NB, BS, 1, Dc + Dr]: MQA with one kv head
    return _decode_run("mla_decode", q, kv, kv[..., :v_head_dim], block_tables, seq_lens, scale, num_splits, chunk,
                       debug)


@_mla_decode_op.register_fake
def _(q, kv_cache, block_tables, seq_lens, scale, v_head_dim, num_splits, chunk, debug=False):
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
    (dsmath_kernels.shared_prefix) of rows sharing leading blocks; their shared blocks are read once per group.
    Bad ids / lengths: ValueError on CPU; on CUDA every kernel flags them (raise_device_errors(), or check_bounds /
    DSMATH_CHECK_BOUNDS=1 to raise in the call)."""
    Hq, D, Hkv = _check_gqa_caches(q, k_cache, v_cache)
    B, dev = q.shape[0], q.device
    _check_tables(block_tables, seq_lens, B, dev)
    scale = _check_scale(scale)
    p = _resolve_plan(plan, B, block_tables, k_cache.shape[1], Hkv, Hq, dev, cascade is not None)
    if cascade is not None:
        if k_cache.dtype != q.dtype and q.dtype != torch.float64:
            raise TypeError(f"k_cache: dtype {k_cache.dtype} differs from q's {q.dtype}")
        return _cascade.gqa_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, p.num_splits, cascade,
                                   _want_bounds(check_bounds))
    return _paged_decode_op(q, k_cache, v_cache, block_tables, seq_lens, scale, p.num_splits, p.chunk,
                            _want_bounds(check_bounds))


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
               scale: float, *, v_head_dim: int = 512, plan: DecodePlan | None = None,
               check_bounds: bool | None = None, kv_scale: torch.Tensor | None = None,
               cascade=None) -> torch.Tensor:
    """Absorbed DeepSeek MLA decode: q [B, H, Dc + Dr] (q_nope absorbed through W_UK, then q_rope),
    kv_cache [NB, BS, Dc + Dr] (compressed kv, then rope key), Dc = v_head_dim -> [B, H, Dc]:
    softmax(scale * q . row) over whole latent rows, weighted sum of the rows' first Dc columns (apply W_UV after).
    scale is the model's softmax scale (1 / sqrt(qk_nope + qk_rope head dim), times the YaRN mscale^2 if any).
    kv_cache may be float8_e4m3fn with kv_scale [NB, BS] float32 (row = fp8 * scale; cascade.mla_cache_write_fp8).
    cascade: a SharedPrefix (dsmath_kernels.shared_prefix): shared prompt blocks are read once per group.
    Bad ids / lengths: ValueError on CPU; on CUDA the kernels (the tiled Triton one included) read them as empty and
    flag them for raise_device_errors() (check_bounds / DSMATH_CHECK_BOUNDS=1: raised in the call)."""
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES + (torch.float64,))
    fp8 = kv_cache.dtype == _cascade.FP8 if isinstance(kv_cache, torch.Tensor) else False
    if fp8:
        check_tensor("kv_cache", kv_cache, ndim=3, device=q.device)
        if kv_cache.stride(-1) != 1 or not 1 <= kv_cache.shape[1] <= MAX_BLOCK_SIZE:
            raise ValueError(f"kv_cache: needs a unit last stride and a block size in 1..{MAX_BLOCK_SIZE}")
    else:
        _check_cache("kv_cache", kv_cache, 3, q.device)
    _cascade.check_kv_scale(kv_cache, kv_scale)
    B, H, D = q.shape
    if H == 0:
        raise ValueError(f"q: expected at least one head, got shape {list(q.shape)}")
    if kv_cache.shape[2] != D:
        raise ValueError(f"kv_cache: row width {kv_cache.shape[2]} differs from q's {D} (Dc + Dr)")
    check_int("v_head_dim", v_head_dim, lo=1, hi=D)
    if kv_cache.dtype != q.dtype and q.dtype != torch.float64 and not fp8:
        raise TypeError(f"kv_cache: dtype {kv_cache.dtype} differs from q's {q.dtype}")
    _check_tables(block_tables, seq_lens, B, q.device)
    scale = _check_scale(scale)
    tiled = fp8 or cascade is not None or _mla_backend(q.device) in ("triton-tc", "cpu-tiled")
    p = _resolve_plan(plan, B, block_tables, kv_cache.shape[1], 1, q.shape[1], q.device, tiled)
    if tiled:
        return _cascade.mla_decode(q, kv_cache, block_tables, seq_lens, scale, v_head_dim, p.num_splits, kv_scale,
                                   cascade, _want_bounds(check_bounds))
    return _mla_decode_op(q, kv_cache, block_tables, seq_lens, scale, v_head_dim, p.num_splits, p.chunk,
                          _want_bounds(check_bounds))


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


def _bounds_prefill(q, block_tables, cu_seqlens_q, seq_lens, num_blocks: int, block_size: int,
                    max_q: int | None = None) -> None:
    """Host check of a prefill call's tables (CPU always, CUDA in debug mode): _bounds, then cu_seqlens_q rising
    from 0 to Nq with n_b <= seq_lens[b], and max_seqlen_q >= the longest run."""
    _bounds(block_tables, seq_lens, num_blocks, block_size)
    cu = cu_seqlens_q.long().cpu()
    n = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or int(cu[-1]) != q.shape[0] or (n < 0).any():
        raise ValueError(f"cu_seqlens_q: must rise from 0 to Nq = {q.shape[0]}, got {cu.tolist()[:16]}")
    sl = seq_lens.long().cpu()
    if (n > sl).any():
        b = int((n > sl).nonzero()[0])
        raise ValueError(f"seq_lens: sequence {b} has {int(sl[b])} tokens but {int(n[b])} queries")
    if max_q is not None and n.numel() and int(n.max()) > max_q:
        raise ValueError(f"max_seqlen_q: {max_q} is below the longest query run, {int(n.max())}")


def _prefill_run(op, q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, causal, max_q,
                 debug=False) -> torch.Tensor:
    NB, BS = k_cache.shape[0], k_cache.shape[1]
    choice = _dispatch.take(_choose_prefill(op, q.device, q.dtype, k_cache.dtype))
    if choice.backend != "triton":  # CPU always; the CUDA reference path syncs anyway
        _bounds_prefill(q, block_tables, cu_seqlens_q, seq_lens, NB, BS, max_q)
    if choice.backend == "triton":
        from dsmath_kernels import attention_triton

        if debug:
            _bounds_prefill(q, block_tables, cu_seqlens_q, seq_lens, NB, BS, max_q)
        _flags_before(q.device, debug)
        out = attention_triton.paged_prefill_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens,
                                                    scale, causal, max_q, _ext.bounds_flags(q.device))
        _flags_after(q.device, debug, lambda: _bounds(block_tables, seq_lens, NB, BS))
        return out
    if choice.backend == "cpu-sdpa":
        return _prefill_sdpa(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, causal)
    return paged_prefill_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, causal)


@torch.library.custom_op("dsmath::paged_prefill", mutates_args=())
def _paged_prefill_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float, causal: bool,
                      max_q: int, debug: bool = False) -> torch.Tensor:
    return _prefill_run("paged_prefill", q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, causal,
                        max_q, debug)


@_paged_prefill_op.register_fake
def _(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, causal, max_q, debug=False):
    return q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])


@torch.library.custom_op("dsmath::mla_prefill", mutates_args=())
def _mla_prefill_op(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    seq_lens: torch.Tensor, scale: float, v_head_dim: int, causal: bool, max_q: int,
                    debug: bool = False) -> torch.Tensor:
    kv = kv_cache.unsqueeze(2)
    return _prefill_run("mla_prefill", q, kv, kv[..., :v_head_dim], block_tables, cu_seqlens_q, seq_lens, scale,
                        causal, max_q, debug)


@_mla_prefill_op.register_fake
def _(q, kv_cache, block_tables, cu_seqlens_q, seq_lens, scale, v_head_dim, causal, max_q, debug=False):
    return q.new_empty(q.shape[0], q.shape[1], v_head_dim)


def _check_prefill(q, block_tables, cu_seqlens_q, seq_lens, max_seqlen_q):
    """Shared prefill checks; returns the longest query run (a host sync only if max_seqlen_q is None)."""
    check_tensor("cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=(torch.int32,), device=q.device)
    B = cu_seqlens_q.shape[0] - 1
    if B < 0:
        raise ValueError("cu_seqlens_q: expected shape [B + 1], got an empty tensor")
    _check_tables(block_tables, seq_lens, B, q.device)
    if max_seqlen_q is None:
        return int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if B > 0 else 0
    return check_int("max_seqlen_q", max_seqlen_q, lo=0)


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float, causal: bool = True, *,
                  max_seqlen_q: int | None = None, check_bounds: bool | None = None) -> torch.Tensor:
    """Varlen prefill against the paged cache: q [Nq, Hq, D] -> [Nq, Hq, Dv]. Sequence b's queries are
    q[cu[b]:cu[b+1]], its LAST n_b = cu[b+1] - cu[b] tokens (positions seq_lens[b] - n_b ..); the cache already
    holds all seq_lens[b] tokens, new ones included (write the cache first). Causal: query at position i sees
    keys at positions <= i. cu_seqlens_q [B + 1] int32; pass max_seqlen_q (max n_b) to avoid a host sync. It must
    be >= every n_b: a smaller value raises ValueError on CPU and in debug mode (DSMATH_CHECK_BOUNDS=1); on GPU
    without debug mode the rows past it are not computed and the device flag is set (raise_device_errors)."""
    Hq, D, Hkv = _check_gqa_caches(q, k_cache, v_cache)
    scale = _check_scale(scale)
    max_q = _check_prefill(q, block_tables, cu_seqlens_q, seq_lens, max_seqlen_q)
    return _paged_prefill_op(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, bool(causal), max_q,
                             _want_bounds(check_bounds))


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
    if q.shape[1] == 0:
        raise ValueError(f"q: expected at least one head, got shape {list(q.shape)}")
    if kv_cache.shape[2] != q.shape[2]:
        raise ValueError(f"kv_cache: row width {kv_cache.shape[2]} differs from q's {q.shape[2]} (Dc + Dr)")
    check_int("v_head_dim", v_head_dim, lo=1, hi=q.shape[2])
    scale = _check_scale(scale)
    max_q = _check_prefill(q, block_tables, cu_seqlens_q, seq_lens, max_seqlen_q)
    return _mla_prefill_op(q, kv_cache, block_tables, cu_seqlens_q, seq_lens, scale, v_head_dim, bool(causal), max_q,
                           _want_bounds(check_bounds))


def _explain_plan(*args, **kwargs) -> _dispatch.Choice:
    plan_decode(*args, **kwargs)  # the checks of a real call
    return _dispatch.by_design("plan_decode", "host", "integer arithmetic on the host (no kernel, no sync)")


_dispatch.register_explain("plan_decode", _explain_plan)
