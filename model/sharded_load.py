"""Sharded loading: every process reads only the slices of the checkpoint it holds, never a full copy.

    with torch.device("meta"):
        model = MoEForCausalLM(cfg)                   # no memory
    index = check_checkpoint(model, path)             # headers only: names, shapes, dtypes, quantisation
    fully_shard(...)                                  # FSDP2 (or tensor/expert parallel placements, or nothing)
    model.to_empty(device=dev)                        # each rank allocates its own shards, uninitialised
    load_sharded(model, path, index)                  # each rank reads its slices (safe_open, memory-mapped)
    # or, for a random init equal at every world size:
    init_sharded(model, seed=0, std=0.02)

Which part of a parameter a process holds is a callback, `owned(tensor) -> (local tensor, offsets)`: the local
tensor covers the box [offsets, offsets + local.shape) of the full parameter. The default reads DTensor placements
(FSDP2's Shard(0), a tensor-parallel Shard(d), Replicate) with torch's own shard arithmetic; a plain tensor is owned
whole. A checkpoint tensor lies in a region of one parameter (a per-expert `experts.N.gate_proj.weight` is rows
[0, I) of expert N in the fused gate_up_proj [E, 2I, H]); each process reads the intersection of that region with
its box, so a rank that holds experts 0..15 of 64 reads only their tensors, and a rank holding rows r0..r1 of the
embedding reads those rows (a strided slice of the memory-mapped file).

Errors come before any weight is materialised, from the headers: a tensor whose shape does not fit the config, an
unknown or missing tensor (named with its file), an FP8/int8 tensor, a `quantization_config` in config.json.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable

import torch

from .loader import _shard_files, _Targets, check_complete

Owned = Callable[[torch.Tensor], tuple[torch.Tensor, tuple[int, ...]]]

# safetensors dtype names that are not plain floating point weights a trainer can start from
_QUANTISED = ("F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "I8", "U8", "I4", "U4")


def owned_box(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Default ownership: (local tensor, offsets of its box in the full tensor). DTensor -> its local shard at the
    offsets its placements give; a plain tensor -> itself at the origin."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        local = t.to_local()
        if tuple(local.shape) != tuple(shape):
            raise RuntimeError(f"owned_box: local shard {list(local.shape)} != the placement's {list(shape)}")
        return local, tuple(offsets)
    return t.data, (0,) * t.dim()


def _span(index: tuple, shape: torch.Size) -> list[tuple[int, int, bool]]:
    """index (ints and slices, shorter than shape allowed) -> per dim (start, stop, squeezed)."""
    out = []
    for d, size in enumerate(shape):
        item = index[d] if d < len(index) else slice(None)
        if isinstance(item, int):
            out.append((item, item + 1, True))
        else:
            start, stop, step = item.indices(size)
            assert step == 1
            out.append((start, stop, False))
    return out


def _intersect(span, offsets, local_shape):
    """-> (index into the checkpoint tensor, index into the local tensor, local sub-shape) or None if disjoint."""
    src, dst = [], []
    for (start, stop, squeezed), off, n in zip(span, offsets, local_shape):
        lo, hi = max(start, off), min(stop, off + n)
        if hi <= lo:
            return None
        if not squeezed:
            src.append(slice(lo - start, hi - start))
        dst.append(slice(lo - off, hi - off))
    return tuple(src), tuple(dst)


def _region_shape(span) -> list[int]:
    return [stop - start for start, stop, squeezed in span if not squeezed]


def _refuse_quantised_config(path: str) -> None:
    f = os.path.join(path, "config.json")
    if os.path.exists(f):
        with open(f) as fh:
            q = json.load(fh).get("quantization_config")
        if q:
            method = q.get("quant_method", "?") if isinstance(q, dict) else q
            raise ValueError(f"{f}: quantization_config ({method}) — a quantised checkpoint cannot be trained or "
                             "loaded into bf16/fp32 shards; dequantize it to bf16 first")


def check_checkpoint(model, path: str, allow_quantized: bool = False) -> dict[str, str]:
    """Read only the safetensors headers (and config.json) of `path` and check them against `model` (on meta, sharded
    or materialised: full shapes are used). -> {checkpoint tensor name: file}. Raises ValueError naming the file and
    tensor for a quantised config or tensor, a shape that does not fit, an unknown or a missing tensor."""
    from safetensors import safe_open

    if not allow_quantized:
        _refuse_quantised_config(path)
    targets = _Targets(model)
    index, unknown, filled = {}, [], set()
    for file in _shard_files(path):
        base = os.path.basename(file)
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                r = targets.region(name)
                if r is None:
                    if not targets.ignorable(name):
                        unknown.append(f"{name} ({base})")
                    continue
                key, idx, covers = r
                sl = f.get_slice(name)
                dtype, shape = sl.get_dtype(), list(sl.get_shape())
                if dtype in _QUANTISED and not allow_quantized:
                    raise ValueError(f"{name} in {base}: dtype {dtype} is quantised; dequantize to bf16 first")
                want = _region_shape(_span(idx, targets.state[key].shape))
                if shape != want:
                    raise ValueError(f"{name} in {base}: shape {shape}, the config needs {want}")
                index[name] = file
                filled.update(covers)
    check_complete(targets, unknown, filled, path)
    return index


@torch.no_grad()
def load_sharded(model, path: str, index: dict[str, str] | None = None, owned: Owned = owned_box) -> int:
    """Fill the parts of `model`'s parameters and buffers this process owns (see `owned`) from the safetensors
    checkpoint at `path`; the model must be materialised (`to_empty`). `index` is check_checkpoint's result (checked
    here when None). -> bytes read from the checkpoint by this process."""
    from safetensors import safe_open

    index = index if index is not None else check_checkpoint(model, path)
    targets = _Targets(model)
    boxes = {k: owned(t) for k, t in targets.state.items()}
    by_file: dict[str, list[str]] = {}
    for name, file in index.items():
        by_file.setdefault(file, []).append(name)
    nbytes = 0
    for file, names in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in names:
                key, idx, _ = targets.region(name)
                local, offsets = boxes[key]
                if local.device.type == "meta":
                    raise RuntimeError(f"load_sharded: {key} is on the meta device; call model.to_empty() first")
                cut = _intersect(_span(idx, targets.state[key].shape), offsets, local.shape)
                if cut is None:
                    continue
                src, dst = cut
                sl = f.get_slice(name)
                full = all(s.start == 0 and s.stop == n for s, n in zip(src, sl.get_shape()))
                t = f.get_tensor(name) if full else sl[src]
                view = local[dst]
                view.copy_(t.reshape(view.shape))
                nbytes += t.numel() * t.element_size()
    return nbytes


def _row_seed(seed: int, name: str, row: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 10_007 + row) % 2**62


@torch.no_grad()
def init_sharded(model, seed: int = 0, std: float = 0.02, owned: Owned = owned_box) -> None:
    """Random init of the parts this process owns, equal to every other sharding of the same model: norms 1,
    other vectors 0 (biases, DeepSeek-V3's score-correction bias), matrices N(0, std) drawn row by row (row = index
    along dim 0; each row from its own generator seeded by (seed, parameter name, row)), so a rank draws only its
    rows and world size 1 and 4 give identical weights. (MoEForCausalLM.init_weights draws the same distribution
    from the global RNG, whole tensors at a time.)"""
    seen = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        local, offsets = owned(t)
        if name.endswith("norm.weight"):
            local.fill_(1.0)
        elif t.dim() <= 1:
            local.zero_()
        else:
            rows = torch.empty(local.shape, dtype=torch.float32)
            cols = tuple(slice(o, o + n) for o, n in zip(offsets[1:], local.shape[1:]))
            for i in range(local.shape[0]):
                g = torch.Generator().manual_seed(_row_seed(seed, name, offsets[0] + i))
                rows[i] = torch.empty(t.shape[1:]).normal_(0.0, std, generator=g)[cols]
            local.copy_(rows)
