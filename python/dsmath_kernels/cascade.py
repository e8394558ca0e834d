"""Tiled paged decode and shared-prefix (cascade) decode for GQA and MLA. Spec: reference/attention.py
(`cascade_decode_ref`; without a cascade the answer is `paged_decode_ref`'s).

GRPO rollouts decode n = 16-64 samples of one prompt at once; their block tables start with the same prompt
blocks (the block manager forks a prompt's blocks by reference count). Plain paged decode reads that prompt once
per sample per step. Cascade decode (FlashInfer's cascade attention) reads it once per group:

    shared pass  every group's queries (members x heads) against the group's shared full blocks, as one batched
                 tile per KV tile                                -> (o1, lse1) per member and head
    suffix pass  each sequence against its own tokens after the shared prefix           -> (o2, lse2)
    merge        out = (2^lse1 o1 + 2^lse2 o2) / (2^lse1 + 2^lse2)      (with the KV splits of both passes)

The groups come from the block tables alone (`find_shared_prefixes`: rows sharing leading block ids, host
integers, no device sync), packaged with `shared_prefix(...)` as a `SharedPrefix` of device tensors and passed as
`cascade=` to `paged_decode` / `mla_decode`. Everything in a decode step after that is graph-safe: fixed shapes
for a padded batch (`pad_to`), no host reads.

Backends: GPU — the Triton kernel of mla_decode_triton.py (tensor cores); CPU — the C++ kernel of
csrc/attn_cascade_cpu.cpp (tiles of 64 tokens x 64 rows, vectorised); float64 or no compiled kernels — the
reference. Also here: the plain decode of mla_decode on those kernels (`tiled_decode`: MLA's default on GPU and
CPU), the fp8-e4m3 cache with per-token scales (`quantize_fp8`, `mla_cache_write_fp8`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from dsmath_kernels import _dispatch, _ext
from dsmath_kernels._checks import check_int, check_tensor
from dsmath_kernels.reference.attention import cascade_decode_ref, dequantize_fp8, paged_decode_ref

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_CHUNK_CPU = 256     # fewest tokens per KV split in the C++ kernel
MIN_CHUNK_SHARED = 512  # GPU shared pass: 64-row tiles make larger partials, so longer splits
MIN_SAVING = 0.125      # shared_prefix(): cascade only when it saves >= 1/8 of the step's KV token reads
FP8_CODE = 6            # attn::kFloat8E4M3 (csrc/include/dsmath/cascade.h)
CPU_ENGINE_ENV = "DSMATH_CPU_ATTN_KERNEL"
CPU_ENGINES = {"auto": 0, "avx2": 1, "portable": 2, "rows": 3}  # attn::kCpuEngine* (cascade.h)
SORT_BLOCKS = 64        # find_shared_prefixes orders rows by their first 64 blocks (sorting whole 128K-token
                        # tables of 256 rows took ~0.1 s a step); sharing deeper than that is still measured in full


# ---------------------------------------------------------------------------------------------- metadata
@dataclass(frozen=True)
class SharedPrefix:
    """Shared-prefix groups of one decode batch of B rows, as the kernels read them (from `shared_prefix`).

    prefix_lens [B] int32  tokens of row b covered by its group's shared pass (a multiple of the block size;
                           0 = not in a group); the suffix pass reads tokens [prefix_lens[b], seq_lens[b]).
    members [M] int32      rows of the groups, group after group.
    tiles [T, 5] int32     shared-pass work: (table row holding the prefix blocks, member begin, member end,
                           first head, prefix length); query rows = members[begin:end] x heads_per_tile heads.
    Host integers: heads_per_tile, num_groups, saved_tokens (KV token reads saved per layer)."""

    prefix_lens: torch.Tensor
    members: torch.Tensor
    tiles: torch.Tensor
    heads_per_tile: int
    num_groups: int
    saved_tokens: int


def _lcps(tables: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Leading equal block ids of adjacent rows: tables [B, W] int (host), full [B] usable blocks -> [B - 1]."""
    if tables.shape[0] < 2:
        return torch.zeros(0, dtype=torch.int64)
    neq = tables[1:] != tables[:-1]  # [B - 1, W]
    first = torch.where(neq.any(1), neq.to(torch.uint8).argmax(1), tables.shape[1])  # first differing block
    return torch.minimum(first, torch.minimum(full[1:], full[:-1]))


def find_shared_prefixes(block_tables, seq_lens, block_size: int, *, min_blocks: int = 1) -> list[tuple[list[int],
                                                                                                       int]]:
    """Groups of rows whose block tables start with the same full blocks (host work, no device sync).

    block_tables: host int tensor [B, W] or a list of B lists of block ids; seq_lens: host ints [B] (tokens in the
    cache). Returns [(rows, shared_blocks)], groups of >= 2 rows sharing >= min_blocks leading blocks that are
    full in every member. Rows are sorted by their tables, so rows sharing longer prefixes are adjacent; a run is
    split at its weakest link whenever that saves more reads ((members - 1) x shared blocks), so a system prompt
    shared by two requests does not hide each request's own n-way prompt sharing."""
    lens = seq_lens.tolist() if isinstance(seq_lens, torch.Tensor) else list(seq_lens)
    B = len(lens)
    if B < 2:
        return []
    # rows sharing anything share their first block: only those rows are read in full (cheap when nothing is shared)
    firsts = (block_tables[:, 0].tolist() if isinstance(block_tables, torch.Tensor) and block_tables.shape[1]
              else [r[0] if len(r) else -1 for r in block_tables])
    count: dict[int, int] = {}
    for b in range(B):
        if lens[b] >= block_size:
            count[firsts[b]] = count.get(firsts[b], 0) + 1
    cand = [b for b in range(B) if lens[b] >= block_size and count[firsts[b]] > 1]
    if not cand:
        return []
    if isinstance(block_tables, torch.Tensor):
        W = block_tables.shape[1]
        keys = dict(zip(cand, block_tables[cand, :SORT_BLOCKS].tolist()))
    else:
        W = max(len(block_tables[b]) for b in cand)
        keys = {b: list(block_tables[b][:SORT_BLOCKS]) for b in cand}
    order = sorted(cand, key=lambda b: keys[b])  # rows sharing a prefix end up adjacent
    B = len(order)
    if isinstance(block_tables, torch.Tensor):
        t = block_tables[order]
    else:
        t = torch.tensor([list(block_tables[b]) + [-1] * (W - len(block_tables[b])) for b in order])
    full = torch.tensor([min(W, lens[b] // block_size) for b in order])
    lcp = _lcps(t, full).tolist()

    def best(lo: int, hi: int) -> tuple[int, list[tuple[list[int], int]]]:
        if hi - lo < 2:
            return 0, []
        seg = lcp[lo:hi - 1]
        m = min(seg)
        bounds = [lo] + [lo + 1 + i for i, x in enumerate(seg) if x == m] + [hi]
        sub_v, sub_g = 0, []
        for a, b in zip(bounds, bounds[1:]):
            v, g = best(a, b)
            sub_v, sub_g = sub_v + v, sub_g + g
        whole = (hi - lo - 1) * m if m >= min_blocks else 0
        if whole > 0 and whole >= sub_v:
            return whole, [([order[i] for i in range(lo, hi)], m)]
        return sub_v, sub_g

    return best(0, B)[1]


def kernel_for(device) -> str:
    """Which kernel's tiling the metadata for `device` must follow: triton (GPU) or cpu (C++ kernel)."""
    return "triton" if torch.device(device).type == "cuda" else "cpu"


def max_tiles(batch_size: int, num_q_heads: int, num_kv_heads: int, kernel: str) -> int:
    """Most shared-pass tiles a batch of batch_size rows can need (the padded size for CUDA graphs)."""
    from dsmath_kernels.mla_decode_triton import tile_shape

    ht, rows = tile_shape(num_q_heads, num_kv_heads, kernel)
    per_head_block = -(-(num_q_heads // num_kv_heads) // ht) * num_kv_heads
    groups = batch_size // 2
    if rows == 0:
        return per_head_block * groups
    per_tile = max(1, rows // ht)
    return per_head_block * (-(-batch_size // per_tile) + groups)


def shared_prefix(block_tables, seq_lens, block_size: int, *, num_q_heads: int, num_kv_heads: int = 1,
                  device=None, pad_to: int | None = None, groups=None, min_saving: float = MIN_SAVING,
                  kernel: str | None = None) -> SharedPrefix | None:
    """Cascade metadata of a decode batch from its host block tables and lengths (see find_shared_prefixes), or
    None when sharing saves less than `min_saving` of the step's KV reads. `groups` overrides the detection.
    pad_to: build fixed-size tensors for a batch padded to pad_to rows (CUDA graphs). kernel: whose tiling
    ("triton" | "cpu"; default: the device's). One host-to-device copy."""
    check_int("block_size", block_size, lo=1)
    check_int("num_kv_heads", num_kv_heads, lo=1)
    check_int("num_q_heads", num_q_heads, lo=num_kv_heads)
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads: {num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    from dsmath_kernels.mla_decode_triton import tile_shape

    device = torch.device(device) if device is not None else torch.device("cpu")
    lens = seq_lens.tolist() if isinstance(seq_lens, torch.Tensor) else list(seq_lens)
    B = len(lens)
    P = B if pad_to is None else check_int("pad_to", pad_to, lo=B)
    if groups is None:
        groups = find_shared_prefixes(block_tables, lens, block_size)
    else:
        _check_groups(groups, block_tables, lens, block_size)
    saved = sum((len(rows) - 1) * blocks * block_size for rows, blocks in groups)
    if not groups or saved < min_saving * max(1, sum(lens)):
        return None
    kernel = kernel or kernel_for(device)
    ht, rows_per_tile = tile_shape(num_q_heads, num_kv_heads, kernel)
    G = num_q_heads // num_kv_heads
    per_tile = max(1, rows_per_tile // ht) if rows_per_tile else P
    prefix = [0] * P
    members: list[int] = []
    tiles: list[list[int]] = []
    for rows, blocks in groups:
        if len(rows) < 1 or blocks < 1 or min(rows) < 0 or max(rows) >= B:
            raise ValueError(f"groups: each group needs rows in [0, {B}) and >= 1 block, got {rows}, {blocks}")
        n = blocks * block_size
        if any(lens[r] < n for r in rows):
            raise ValueError(f"groups: rows {rows} do not all hold {n} tokens")
        m0 = len(members)
        members += rows
        for r in rows:
            if prefix[r]:
                raise ValueError(f"groups: row {r} is in two groups")
            prefix[r] = n
        for kvh in range(num_kv_heads):
            for h in range(kvh * G, (kvh + 1) * G, ht):
                for a in range(m0, len(members), per_tile):
                    tiles.append([rows[0], a, min(a + per_tile, len(members)), h, n])
    T = len(tiles) if pad_to is None else max_tiles(P, num_q_heads, num_kv_heads, kernel)
    if len(tiles) > T:  # cannot happen for valid groups; guards the padded graph buffers
        raise ValueError(f"groups: {len(tiles)} tiles exceed the {T} of a {P}-row batch")
    flat = prefix + members + [0] * (P - len(members)) + [x for t in tiles for x in t] + [0] * (5 * (T - len(tiles)))
    host = torch.tensor(flat, dtype=torch.int32)
    dev = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
    return SharedPrefix(dev[:P], dev[P:2 * P], dev[2 * P:].view(T, 5), ht, len(groups), saved)


def _check_groups(groups, block_tables, lens: list[int], block_size: int) -> None:
    """Given groups must really share their blocks: equal ids in every member's table, full in every member."""
    tables = block_tables if isinstance(block_tables, torch.Tensor) else None
    B = len(lens)
    for rows, blocks in groups:
        if len(rows) < 1 or blocks < 1 or min(rows) < 0 or max(rows) >= B:
            raise ValueError(f"groups: each group needs rows in [0, {B}) and >= 1 block, got {rows}, {blocks}")
        first = (tables[rows[0], :blocks] if tables is not None else torch.tensor(block_tables[rows[0]][:blocks]))
        for r in rows:
            mine = tables[r, :blocks] if tables is not None else torch.tensor(block_tables[r][:blocks])
            if mine.shape != first.shape or not torch.equal(mine.long(), first.long()) or lens[r] < blocks * block_size:
                raise ValueError(f"groups: row {r} does not hold the group's {blocks} shared full blocks")


def prefix_rows(cascade: SharedPrefix, batch_size: int) -> torch.Tensor:
    """[B] int64: the table row each sequence's shared prefix is read through (its own row when not grouped)."""
    rows = torch.arange(batch_size, device=cascade.tiles.device)
    t = cascade.tiles.long()
    for i in range(t.shape[0]):  # reference / tests only: host loop over the tiles
        row, m0, m1 = (int(x) for x in t[i, :3])
        rows[cascade.members[m0:m1].long()] = row
    return rows


def _check_cascade(cascade, B: int, block_size: int, seq_lens: torch.Tensor, device, debug: bool) -> None:
    """Shapes always; with debug bounds checks (a host sync) also the contents: prefixes of whole blocks within
    each sequence, tiles that list valid members."""
    if not isinstance(cascade, SharedPrefix):
        raise TypeError(f"cascade: expected a SharedPrefix from shared_prefix(), got {type(cascade).__name__}")
    check_tensor("cascade.prefix_lens", cascade.prefix_lens, ndim=1, dtypes=(torch.int32,), device=device)
    check_tensor("cascade.members", cascade.members, ndim=1, dtypes=(torch.int32,), device=device)
    check_tensor("cascade.tiles", cascade.tiles, ndim=2, dtypes=(torch.int32,), device=device)
    if cascade.prefix_lens.shape[0] != B:
        raise ValueError(f"cascade.prefix_lens: expected shape [{B}] (one per sequence), got "
                         f"{list(cascade.prefix_lens.shape)}")
    if cascade.tiles.shape[1] != 5 or not cascade.tiles.is_contiguous():
        raise ValueError(f"cascade.tiles: expected a contiguous [T, 5] tensor, got {list(cascade.tiles.shape)}")
    if cascade.members.shape[0] < 1 or cascade.members.shape[0] > max(B, 1):
        raise ValueError(f"cascade.members: expected 1..{B} entries, got {cascade.members.shape[0]}")
    if not debug:
        return
    pl, sl = cascade.prefix_lens.long().cpu(), seq_lens.long().cpu()
    bad = (pl % block_size != 0) | (pl < 0) | (pl > sl)
    if bad.any():
        b = int(bad.nonzero()[0])
        raise ValueError(f"cascade.prefix_lens: sequence {b} has {int(pl[b])}, not whole blocks of {block_size} "
                         f"within its {int(sl[b])} tokens")
    t, mem = cascade.tiles.long().cpu(), cascade.members.long().cpu()
    for i, (row, m0, m1, _, n) in enumerate(t.tolist()):
        if m0 == m1:
            continue
        ok = 0 <= row < B and 0 <= m0 < m1 <= mem.shape[0] and n % block_size == 0
        ok = ok and bool(((mem[m0:m1] >= 0) & (mem[m0:m1] < B)).all()) and bool((pl[mem[m0:m1]] == n).all())
        if not ok:
            raise ValueError(f"cascade.tiles: tile {i} = {[row, m0, m1, _, n]} lists rows or a length that do not "
                             f"match prefix_lens / members")


# ---------------------------------------------------------------------------------------------- fp8 cache
def quantize_fp8(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp8-e4m3 quantization: rows [N, ...] -> (rows / s as float8_e4m3fn, s [N] float32), s = amax / 448
    (1 for an all-zero row); rows ~= fp8.float() * s."""
    flat = rows.reshape(rows.shape[0], -1).float()
    s = (flat.abs().amax(1) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    s = torch.where(flat.abs().amax(1) > 0, s, torch.ones_like(s))
    return (flat / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(rows.shape), s


def dequantized_blocks(kv_cache: torch.Tensor, kv_scale: torch.Tensor, block_tables: torch.Tensor,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks block_tables [B, W] references in an fp8 kv_cache [NB, BS, D] (with kv_scale [NB, BS]),
    dequantised into a dense cache [U, BS, D] of `dtype`, and the tables renumbered into it ([B, W] int32; entries
    < 0 read block 0, which a valid table never reads past seq_lens). For paths without fp8 kernels (prefill):
    memory and bytes of the U blocks used, not the whole cache; one host sync (the unique blocks)."""
    used, tables = torch.unique(block_tables.clamp_min(0), return_inverse=True)  # [U], [B, W]
    rows = kv_cache.view(torch.uint8)[used].view(FP8)  # [U, BS, D] (no e4m3 indexing on every backend)
    return (rows.float() * kv_scale[used][..., None]).to(dtype), tables.to(torch.int32)


def mla_cache_write_fp8(kv: torch.Tensor, kv_cache: torch.Tensor, kv_scale: torch.Tensor,
                        slot_mapping: torch.Tensor) -> None:
    """Quantize new latent rows kv [N, Dc + Dr] (quantize_fp8) into an fp8 kv_cache [NB, BS, Dc + Dr] and their
    scales into kv_scale [NB, BS] float32 at slot_mapping [N] (-1 = skip), in place; graph safe on GPU (the CUDA
    cache-write kernel), a host sync on CPU."""
    check_tensor("kv", kv, ndim=2)
    check_tensor("kv_cache", kv_cache, ndim=3, dtypes=(FP8,), device=kv.device)
    check_tensor("kv_scale", kv_scale, ndim=2, dtypes=(torch.float32,), device=kv.device)
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int32, torch.int64), device=kv.device)
    if tuple(kv_scale.shape) != tuple(kv_cache.shape[:2]):
        raise ValueError(f"kv_scale: expected shape {list(kv_cache.shape[:2])} (one per cache slot), got "
                         f"{list(kv_scale.shape)}")
    if kv.shape[1] != kv_cache.shape[2] or slot_mapping.shape[0] != kv.shape[0]:
        raise ValueError(f"kv / slot_mapping: expected kv [N, {kv_cache.shape[2]}] and slot_mapping [N], got "
                         f"{list(kv.shape)} and {list(slot_mapping.shape)}")
    q8, s = quantize_fp8(kv)
    if kv.device.type == "cuda" and kv.shape[1] % 2 == 0 and _ext.has_cuda_kernels(kv.device):
        from dsmath_kernels.attention import _write_rows  # the CUDA row copy; slot -1 skips (graph safe)

        # fp8 rows travel as raw 16-bit words (fp16 -> fp16: a bit-exact copy), scales as 1-wide fp32 rows
        _write_rows(q8.view(torch.float16), kv_cache.view(torch.float16), slot_mapping)
        _write_rows(s[:, None], kv_scale.unsqueeze(2), slot_mapping)
        return
    keep = slot_mapping >= 0  # [N]; a host sync: the CPU / fallback path
    slots = slot_mapping[keep].long()
    bs = kv_cache.shape[1]
    kv_cache.view(torch.uint8)[slots // bs, slots % bs] = q8[keep].view(torch.uint8)
    kv_scale[slots // bs, slots % bs] = s[keep]


# ---------------------------------------------------------------------------------------------- kernels
def choose(op: str, device: torch.device, dtype: torch.dtype) -> _dispatch.Choice:
    """The tiled kernels' backend for a call of `op` (mla_decode / paged_decode): triton-tc (GPU, tensor cores) |
    cpu-tiled (C++ tiled kernel) | reference (float64, DSMATH_FORCE_REFERENCE, or a fallback that says why)."""
    forced = _dispatch.forced(op)
    if forced:
        return forced
    if dtype == torch.float64:
        return _dispatch.by_design(op, "reference", "float64 runs the reference (the kernels take fp32/fp16/bf16)")
    if device.type == "cuda":
        from dsmath_kernels import mla_decode_triton

        if mla_decode_triton.available():
            return _dispatch.kernel(op, "triton-tc")
        return _dispatch.no_triton(op, "reference")
    if device.type == "cpu":
        if _ext.has_cpu_kernels() and hasattr(_ext.C(), "attend_cpu"):
            return _dispatch.kernel(op, "cpu-tiled")
        return _dispatch.fallback(op, "reference", "the compiled module has no attend_cpu kernel",
                                  "reinstall dsmath_kernels (pip install .)")
    return _dispatch.no_device_kernel(op, device, "reference")


def _backend(device: torch.device) -> str:
    """Registry entry: the tiled kernels' backend for a default-shaped bf16 call on `device` (no policy applied)."""
    return {"triton-tc": "triton", "cpu-tiled": "cpu"}.get(choose("mla_decode", device, torch.bfloat16).backend,
                                                           "reference")


def cpu_engine() -> int:
    """The C++ kernel's engine code from DSMATH_CPU_ATTN_KERNEL: auto (default: the widest GEMM engine the CPU runs,
    AVX-512 / AVX2 / portable), avx2 or portable (at most that wide: tests of every build), rows (the per-sequence
    pass on the row-block kernel of issue 16, as a benchmark baseline; the shared pass always runs the engine)."""
    import os

    name = os.environ.get(CPU_ENGINE_ENV, "auto") or "auto"
    if name not in CPU_ENGINES:
        raise ValueError(f"{CPU_ENGINE_ENV}: expected one of {sorted(CPU_ENGINES)}, got {name!r}")
    return CPU_ENGINES[name]


def cpu_isa() -> str:
    """Vector ISA the C++ kernel's GEMM engine runs here under DSMATH_CPU_ATTN_KERNEL: avx512 | avx2 | portable."""
    return _ext.C().attend_cpu_isa(cpu_engine())


def _cpu_pass(params: dict, bad: torch.Tensor, threads: int) -> None:
    _ext.C().attend_cpu(params, threads)
    if int(bad[0]) >= 0:
        row, index, value = (int(x) for x in bad)
        if value < 0:
            raise ValueError(f"seq_lens: sequence {row} reads block-table entry {index}, past the "
                             f"{params['bt_width']} entries of block_tables")
        raise ValueError(f"block_tables: entry [{row}, {index}] = {value} is outside the cache's "
                         f"{params['num_blocks']} blocks")


def _run_cpu(q, k, v, bt, sl, scale, splits, kv_scale, cascade, out) -> None:
    B, Hq, D = q.shape
    threads = torch.get_num_threads()
    bad = torch.full((3,), -1, dtype=torch.int64)
    nslot = splits * (2 if cascade is not None else 1)
    direct = nslot == 1
    po = None if direct else torch.empty(B, Hq, nslot, v.shape[-1], dtype=torch.float32)
    plse = None if direct else torch.full((B, Hq, nslot), float("-inf"), dtype=torch.float32)
    common = dict(q=q.data_ptr(), q_sb=q.stride(0), q_sh=q.stride(1), q_dtype=_ext.dtype_code(q), k=k.data_ptr(),
                  k_sblk=k.stride(0), k_stok=k.stride(1), k_sh=k.stride(2), v=v.data_ptr(), v_sblk=v.stride(0),
                  v_stok=v.stride(1), v_sh=v.stride(2), kv_dtype=_kv_code(k),
                  k_scale=_ext.ptr(kv_scale), ks_sblk=kv_scale.stride(0) if kv_scale is not None else 0,
                  block_tables=bt.data_ptr(), bt_sb=bt.stride(0), bt_width=bt.shape[1], seq_lens=sl.data_ptr(),
                  out=_ext.ptr(out if direct else None), part_o=_ext.ptr(po), part_lse=_ext.ptr(plse), nslot=nslot,
                  B=B, Hq=Hq, Hkv=k.shape[2], D=D, Dv=v.shape[-1], block_size=k.shape[1], num_blocks=k.shape[0],
                  scale=float(scale), num_splits=splits, min_chunk=MIN_CHUNK_CPU, bad=bad.data_ptr(),
                  engine=cpu_engine())
    if cascade is not None:
        tiles = cascade.tiles
        _cpu_pass({**common, "start": 0, "tiles": tiles.data_ptr(), "num_tiles": tiles.shape[0],
                   "members": cascade.members.data_ptr(), "heads_per_tile": cascade.heads_per_tile, "slot0": 0},
                  bad, threads)
    _cpu_pass({**common, "start": _ext.ptr(cascade.prefix_lens if cascade is not None else None), "tiles": 0,
               "num_tiles": 0, "members": 0, "heads_per_tile": 1, "slot0": nslot - splits}, bad, threads)
    if not direct:
        _ext.C().merge_partials_cpu(po.data_ptr(), plse.data_ptr(), out.data_ptr(), _ext.dtype_code(out), B * Hq,
                                    nslot, v.shape[-1], threads)


@functools.cache
def _plain_tiles(B: int, Hq: int, Hkv: int, ht: int, device: torch.device) -> torch.Tensor:
    """[T, 5] tiles of the per-sequence pass for 64-row tiles: (b, b, b + 1, first head, 0). Built on the device
    (arange ops, no host copy) once per shape."""
    G = Hq // Hkv
    heads = torch.tensor([kvh * G + h for kvh in range(Hkv) for h in range(0, G, ht)], device=device)
    b = torch.arange(B, device=device).repeat_interleave(heads.shape[0])
    h0 = heads.repeat(B)
    return torch.stack([b, b, b + 1, h0, torch.zeros_like(b)], 1).to(torch.int32).contiguous()


def _run_gpu(q, k, v, bt, sl, scale, splits, kv_scale, cascade, out, shared_v: bool | None = None,
             flags: torch.Tensor | None = None) -> None:
    """Both passes and the merge on the Triton kernel. flags: the int32 [1] word its passes OR bounds bits into
    (default on CUDA: the device's `_ext.bounds_flags`, read by raise_device_errors; elsewhere a scratch word)."""
    from dsmath_kernels import mla_decode_triton as tk

    B, Hq, _ = q.shape
    Hkv = k.shape[2]
    ht, _ = tk.tile_shape(Hq, Hkv, "triton")
    nslot = splits * (2 if cascade is not None else 1)
    # one pass, one split: the kernel writes `out` itself, except from 64-row tiles (V3's 128 heads), whose direct
    # 16-bit epilogue spills at sm_90 (228 B, the compile sweep): those write fp32 partials and merge
    direct = nslot == 1 and ht <= tk.MAX_TRANS_ROWS
    po = plse = None
    if not direct:
        po = torch.empty(B, Hq, nslot, v.shape[-1], dtype=torch.float32, device=q.device)
        plse = torch.full((B, Hq, nslot), float("-inf"), dtype=torch.float32, device=q.device)
    if flags is None and q.device.type == "cuda":
        flags = _ext.bounds_flags(q.device)
    kw = dict(kv_scale=kv_scale, out=out, po=po, plse=plse, num_splits=splits, shared_v=shared_v, flags=flags)
    if cascade is not None:
        tk.attend(q, k, v, bt, sl, scale, tiles=cascade.tiles, members=cascade.members, tile_len=True,
                  heads_per_tile=cascade.heads_per_tile, slot0=0, min_chunk=MIN_CHUNK_SHARED, **kw)
    tiles = None if ht <= tk.MAX_TRANS_ROWS else _plain_tiles(B, Hq, Hkv, ht, q.device)
    tk.attend(q, k, v, bt, sl, scale, start=cascade.prefix_lens if cascade is not None else None, tiles=tiles,
              heads_per_tile=ht, slot0=nslot - splits, **kw)
    if not direct:
        tk.merge(po, plse, out)


def _kv_code(k: torch.Tensor) -> int:
    return FP8_CODE if k.dtype == FP8 else _ext.dtype_code(k)


def tiled_run(op: str, q, k, v, block_tables, seq_lens, scale: float, num_splits: int, kv_scale=None,
              cascade: SharedPrefix | None = None, shared_v: bool = False) -> torch.Tensor:
    """q [B, Hq, D], k [NB, BS, Hkv, D], v [NB, BS, Hkv, Dv] (v may be a view of k: MLA), fp8 caches with
    kv_scale [NB, BS] -> [B, Hq, Dv] in q's dtype. Arguments checked by the public ops."""
    B, Hq, _ = q.shape
    backend = _dispatch.take(choose(op, q.device, q.dtype)).backend
    out = torch.empty(B, Hq, v.shape[-1], dtype=q.dtype, device=q.device)
    if B == 0 or Hq == 0:
        return out
    if backend == "reference":
        kk, vv = (dequantize_fp8(k, kv_scale), dequantize_fp8(v, kv_scale)) if kv_scale is not None else (k, v)
        if cascade is None:
            return paged_decode_ref(q, kk.to(q.dtype), vv.to(q.dtype), block_tables, seq_lens, scale)
        return cascade_decode_ref(q, kk.to(q.dtype), vv.to(q.dtype), block_tables, seq_lens, scale,
                                  cascade.prefix_lens, prefix_rows(cascade, B))
    q = q if q.stride(2) == 1 else q.contiguous()
    bt = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    sl = seq_lens.contiguous()
    if backend == "cpu-tiled":
        _run_cpu(q, k, v, bt, sl, scale, num_splits, kv_scale, cascade, out)
    else:
        _run_gpu(q, k, v, bt, sl, scale, num_splits, kv_scale, cascade, out, shared_v)
    return out


# ---------------------------------------------------------------------------------------------- ops
@torch.library.custom_op("dsmath::tiled_decode", mutates_args=())
def _tiled_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, num_splits: int, prefix_lens: torch.Tensor | None,
                     members: torch.Tensor | None, tiles: torch.Tensor | None, heads_per_tile: int) -> torch.Tensor:
    sp = None if tiles is None else SharedPrefix(prefix_lens, members, tiles, heads_per_tile, 0, 0)
    return tiled_run("paged_decode", q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits, None, sp)


@_tiled_decode_op.register_fake
def _(q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits, prefix_lens, members, tiles, heads_per_tile):
    return q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])


@torch.library.custom_op("dsmath::mla_tiled_decode", mutates_args=())
def _mla_tiled_decode_op(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                         seq_lens: torch.Tensor, scale: float, v_head_dim: int, num_splits: int,
                         kv_scale: torch.Tensor | None, prefix_lens: torch.Tensor | None,
                         members: torch.Tensor | None, tiles: torch.Tensor | None,
                         heads_per_tile: int) -> torch.Tensor:
    kv = kv_cache.unsqueeze(2)  # [NB, BS, 1, Dc + Dr]: one latent kv head; values = its first Dc columns
    sp = None if tiles is None else SharedPrefix(prefix_lens, members, tiles, heads_per_tile, 0, 0)
    return tiled_run("mla_decode", q, kv, kv[..., :v_head_dim], block_tables, seq_lens, scale, num_splits, kv_scale,
                     sp, shared_v=True)


@_mla_tiled_decode_op.register_fake
def _(q, kv_cache, block_tables, seq_lens, scale, v_head_dim, num_splits, kv_scale, prefix_lens, members, tiles,
      heads_per_tile):
    return q.new_empty(q.shape[0], q.shape[1], v_head_dim)


def _parts(cascade: SharedPrefix | None) -> tuple:
    if cascade is None:
        return None, None, None, 1
    return cascade.prefix_lens, cascade.members, cascade.tiles, cascade.heads_per_tile


def _check_ids(block_tables, seq_lens, cache: torch.Tensor, debug: bool) -> None:
    """Block ids and lengths, as every decode call checks them (attention._bounds: ValueError naming the argument):
    on CPU always (vectorised), on GPU in debug mode (a host sync). Otherwise on GPU the Triton kernel reads a bad
    id's tokens as empty and sets the device's bounds flags (bit 1 block_tables, bit 2 seq_lens), which
    `raise_device_errors()` turns into the same ValueError."""
    if debug or cache.device.type != "cuda":
        from dsmath_kernels.attention import _bounds

        _bounds(block_tables, seq_lens, cache.shape[0], cache.shape[1])


def gqa_decode(q, k_cache, v_cache, block_tables, seq_lens, scale: float, num_splits: int,
               cascade: SharedPrefix | None, debug: bool = False) -> torch.Tensor:
    """paged_decode through the tiled kernels (attention.paged_decode checked the arguments)."""
    _check_ids(block_tables, seq_lens, k_cache, debug)
    if cascade is not None:
        _check_cascade(cascade, q.shape[0], k_cache.shape[1], seq_lens, q.device, debug)
    return _tiled_decode_op(q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits, *_parts(cascade))


def mla_decode(q, kv_cache, block_tables, seq_lens, scale: float, v_head_dim: int, num_splits: int,
               kv_scale: torch.Tensor | None, cascade: SharedPrefix | None, debug: bool = False) -> torch.Tensor:
    """mla_decode through the tiled kernels (attention.mla_decode checked the arguments)."""
    _check_ids(block_tables, seq_lens, kv_cache, debug)
    if cascade is not None:
        _check_cascade(cascade, q.shape[0], kv_cache.shape[1], seq_lens, q.device, debug)
    return _mla_tiled_decode_op(q, kv_cache, block_tables, seq_lens, scale, v_head_dim, num_splits, kv_scale,
                                *_parts(cascade))


def check_kv_scale(kv_cache: torch.Tensor, kv_scale) -> None:
    """An fp8 cache needs its per-token scales [NB, BS] float32; other caches take none."""
    if kv_cache.dtype == FP8:
        if kv_scale is None:
            raise ValueError("kv_scale: an fp8-e4m3 kv_cache needs its per-token scales [NB, BS] float32")
        check_tensor("kv_scale", kv_scale, ndim=2, dtypes=(torch.float32,), device=kv_cache.device)
        if tuple(kv_scale.shape) != tuple(kv_cache.shape[:2]) or kv_scale.stride(1) != 1:
            raise ValueError(f"kv_scale: expected shape {list(kv_cache.shape[:2])} with unit last stride, got "
                             f"{list(kv_scale.shape)} strides {kv_scale.stride()}")
    elif kv_scale is not None:
        raise ValueError(f"kv_scale: only fp8 caches take scales; kv_cache is {kv_cache.dtype}")

