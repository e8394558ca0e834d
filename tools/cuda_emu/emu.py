"""Every CUDA file of csrc/, run on the CPU: each .cu is rewritten for the host compiler (kernel launches become
emu::launch calls, __shared__ declarations per-block poisoned storage), compiled with g++ under the shims of
include/emu.h (threads as fibers, faithful warp collectives, loud failures) into one shared library together with
emu_api.cpp, and driven through ctypes with torch CPU tensors. tests/test_cuda_emu.py compares every kernel with
the C++ CPU kernels (or the reference) on edge cases.

    from tools.cuda_emu import emu
    lib = emu.library()                       # builds once per source hash (cache: ~/.cache/dsmath/cuda_emu)
    w, i = emu.route_topk(logits, 8, ...)     # emulated csrc/route_topk.cu

The grid limit DSMATH_MAX_GRID_YZ is lowered to 4 in the emulation, so the launchers' batch splitting runs on
small batches. Checks the kernels' indexing, synchronisation and warp logic; not speed or the memory model."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
MAX_GRID_YZ = 4
CXX = os.environ.get("CXX", "g++")
FLAGS = ["-std=c++20", "-O1", "-g0", "-fPIC", "-pthread", "-U_FORTIFY_SOURCE", f"-DDSMATH_MAX_GRID_YZ={MAX_GRID_YZ}",
         f"-I{os.path.join(HERE, 'include')}", f"-I{os.path.join(CSRC, 'include')}"]
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int32: 3, torch.int64: 4}


class EmuError(RuntimeError):
    """A launcher returned an error status in the emulation (bad argument, launch failure, emulation failure)."""


# ---------------------------------------------------------------------------------------------- translation
def _split_top(s: str) -> list[str]:
    """Split on commas outside (), [], {}, <> nesting of a launch configuration / argument list."""
    out, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\((.*?)\);", re.S)
_SHARED = re.compile(r"(extern\s+)?__shared__\s+([\w:]+)\s+([^;]+);")


def translate(src: str) -> str:
    """CUDA source -> host C++ for emu.h: launches and __shared__ declarations rewritten, nothing else touched."""

    def launch(m: re.Match) -> str:
        name, cfg, args = m.group(1), _split_top(m.group(2)), m.group(3)
        if not 2 <= len(cfg) <= 4:
            raise ValueError(f"cuda_emu: cannot parse launch configuration <<<{m.group(2)}>>>")
        cfg += ["0", "nullptr"][len(cfg) - 2:]
        return (f'emu::launch("{re.sub(r"<.*", "", name)}", {cfg[0]}, {cfg[1]}, {cfg[2]}, {cfg[3]}, '
                f"[=]() {{ {name}({args}); }});")

    def shared(m: re.Match) -> str:
        extern, typ, decls = m.group(1), m.group(2), _split_top(m.group(3))
        out = []
        for d in decls:
            dm = re.fullmatch(r"(\w+)\s*((?:\[[^\]]*\]\s*)*)", d.strip())
            if not dm:
                raise ValueError(f"cuda_emu: cannot parse __shared__ declarator {d!r}")
            name, dims = dm.group(1), re.sub(r"\s+", "", dm.group(2))
            if extern:
                if dims != "[]":
                    raise ValueError(f"cuda_emu: extern __shared__ {name} must be an unsized array")
                out.append(f"{typ}* {name} = emu::dynamic_smem<{typ}>();")
            else:
                out.append(f"auto& {name} = emu::shared_var<{typ}{dims}, __COUNTER__>();")
        return " ".join(out)

    src = re.sub(r"cudaFuncSetAttribute\(\s*(\w+)\s*,", r'cudaFuncSetAttribute("\1",', src)
    return _SHARED.sub(shared, _LAUNCH.sub(launch, src))


# ---------------------------------------------------------------------------------------------- build
def cuda_sources() -> dict[str, str]:
    """{path: text} of every csrc/*.cu."""
    out = {}
    for f in sorted(os.listdir(CSRC)):
        if f.endswith(".cu"):
            with open(os.path.join(CSRC, f)) as fh:
                out[os.path.join(CSRC, f)] = fh.read()
    return out


def _digest(sources: dict[str, str]) -> str:
    h = hashlib.sha256()
    files = [os.path.join(HERE, "emu_api.cpp")]
    for d in (os.path.join(HERE, "include"), os.path.join(CSRC, "include", "dsmath")):
        files += sorted(os.path.join(d, f) for f in os.listdir(d))
    for f in files + [__file__]:
        with open(f, "rb") as fh:
            h.update(f.encode() + b"\0" + fh.read())
    for name, text in sorted(sources.items()):
        h.update(name.encode() + b"\0" + text.encode())
    h.update(" ".join([CXX, *FLAGS]).encode())
    h.update(subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout.encode())
    return h.hexdigest()[:16]


def build(sources: dict[str, str] | None = None, out_dir: str | None = None, jobs: int | None = None) -> str:
    """Translate and compile CUDA sources ({path: text}, default every csrc/*.cu) with emu_api.cpp into one shared
    library; returns its path. Cached by the hash of every input (sources, headers, flags, compiler version)."""
    sources = cuda_sources() if sources is None else sources
    cache = out_dir or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dsmath",
                                    "cuda_emu", _digest(sources))
    lib = os.path.join(cache, "libdsmath_cuda_emu.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(cache, exist_ok=True)
    work = tempfile.mkdtemp(dir=cache)
    units = []
    for path, src in sources.items():
        unit = os.path.join(work, os.path.basename(path) + ".cpp")
        with open(unit, "w") as f:
            f.write(f'#line 1 "{path}"\n' + translate(src))
        units.append(unit)
    units.append(os.path.join(HERE, "emu_api.cpp"))

    def compile_one(unit: str) -> str:
        obj = os.path.join(work, os.path.basename(unit) + ".o")
        proc = subprocess.run([CXX, *FLAGS, "-c", unit, "-o", obj], capture_output=True, text=True)
        if proc.returncode:
            raise EmuError(f"cuda_emu: {os.path.basename(unit)} does not compile under the emulation:\n"
                           f"{proc.stderr[-4000:]}")
        return obj

    with ThreadPoolExecutor(jobs or os.cpu_count() or 1) as ex:
        objs = list(ex.map(compile_one, units))
    tmp = lib + f".{os.getpid()}.tmp"
    proc = subprocess.run([CXX, "-shared", "-pthread", *objs, "-o", tmp], capture_output=True, text=True)
    if proc.returncode:
        raise EmuError(f"cuda_emu: link failed:\n{proc.stderr[-4000:]}")
    os.replace(tmp, lib)
    return lib


def load(path: str) -> ctypes.CDLL:
    """A built emulation library with its C entry points typed."""
    lib = ctypes.CDLL(path)
    P, I, L, F = ctypes.c_uint64, ctypes.c_int, ctypes.c_int64, ctypes.c_float  # noqa: E741
    sigs = {
        "emu_route_topk": [P, I, L, I, L, P, I, I, I, I, I, F, P, P],
        "emu_route_weights": [P, I, L, I, L, P, I, I, I, F, P],
        "emu_moe_permute": [P, L, I, I, P, P, P, P, P],
        "emu_moe_workspace": [L, I],
        "emu_cache_write": [P, L, P, L, L, I, L, I, P, I, L, L, P],
        "emu_paged_decode": [P, L, L, P, L, L, L, P, L, L, L, P, L, P, P, P, P, I, I, I, I, I, I, I, F, I, I, I, I, P],
        "emu_configure": [I, I],
    }
    for name, args in sigs.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = ctypes.c_int
    lib.emu_moe_workspace.restype = ctypes.c_longlong
    lib.emu_switches.restype = ctypes.c_longlong
    lib.emu_last_error.restype = ctypes.c_char_p
    lib.emu_launch_message.restype = ctypes.c_char_p
    return lib


@functools.cache
def library() -> ctypes.CDLL:
    """The emulation of every csrc/*.cu (built on first use)."""
    return load(build())


def configure(*, reverse_threads: bool = False, reverse_blocks: bool = False, lib: ctypes.CDLL | None = None) -> None:
    """Order in which the emulation runs a block's threads and a grid's blocks (both valid CUDA schedules)."""
    (lib or library()).emu_configure(int(reverse_threads), int(reverse_blocks))


def _check(status: int, what: str, lib: ctypes.CDLL) -> None:
    if status:
        msg = lib.emu_last_error().decode()
        kind = {1: "bad argument", 2: "unsupported", 3: "CUDA error", -1: "not built"}.get(status, f"status {status}")
        raise EmuError(f"{what}: {kind}" + (f": {msg}" if msg else ""))


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


# ---------------------------------------------------------------------------------------------- kernels
def route_topk(logits: torch.Tensor, top_k: int, *, scoring: str = "softmax", bias: torch.Tensor | None = None,
               n_group: int = 1, topk_group: int = 1, renormalize: bool = True,
               routed_scaling_factor: float = 1.0, lib: ctypes.CDLL | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """csrc/route_topk.cu on the CPU: logits [T, E] (unit column stride) -> (weights [T, K] fp32, ids [T, K] int32)."""
    T, E = logits.shape
    w = torch.full((T, top_k), float("nan"))
    i = torch.full((T, top_k), -7, dtype=torch.int32)
    b = None if bias is None else bias.float().contiguous()
    lib = lib or library()
    st = lib.emu_route_topk(_ptr(logits), DTYPE_CODES[logits.dtype], T, E, logits.stride(0), _ptr(b), top_k,
                                  n_group, topk_group, {"softmax": 0, "sigmoid": 1}[scoring], int(renormalize),
                                  routed_scaling_factor, _ptr(w), _ptr(i))
    _check(st, "route_topk_cuda", lib)
    return w, i


def route_topk_weights(logits: torch.Tensor, ids: torch.Tensor, *, scoring: str = "softmax", renormalize: bool = True,
                       routed_scaling_factor: float = 1.0, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """csrc/route_topk.cu's replay kernel on the CPU: weights [T, K] fp32 of the given expert ids [T, K]."""
    T, E = logits.shape
    K = ids.shape[1]
    ids32 = ids.to(torch.int32).contiguous()
    w = torch.full((T, K), float("nan"))
    lib = lib or library()
    st = lib.emu_route_weights(_ptr(logits), DTYPE_CODES[logits.dtype], T, E, logits.stride(0), _ptr(ids32), K,
                               {"softmax": 0, "sigmoid": 1}[scoring], int(renormalize), routed_scaling_factor, _ptr(w))
    _check(st, "route_weights_cuda", lib)
    return w


def moe_permute(ids: torch.Tensor, E: int, block_m: int = 1,
                lib: ctypes.CDLL | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """csrc/moe_permute.cu on the CPU: ids [T, K] int32 -> (order, expert_offsets, inverse, flags)."""
    lib = lib or library()
    T, K = ids.shape
    P = T * K
    ids = ids.to(torch.int32).contiguous()
    R = P + min(E, P) * (block_m - 1)
    order = torch.full((R,), -7, dtype=torch.int32)
    offsets = torch.full((E + 1,), -7, dtype=torch.int32)
    inverse = torch.full((T, K), -7, dtype=torch.int32)
    ws = torch.full((lib.emu_moe_workspace(P, E),), 12345, dtype=torch.int32)  # garbage: the kernel resets
    flags = torch.zeros(1, dtype=torch.int32)
    st = lib.emu_moe_permute(_ptr(ids), P, E, block_m, _ptr(order), _ptr(offsets), _ptr(inverse), _ptr(ws),
                                   _ptr(flags))
    _check(st, "moe_permute_cuda", lib)
    return order, offsets, inverse, int(flags)


def cache_write(src: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor, lib: ctypes.CDLL | None = None) -> int:
    """csrc/attn_cache.cu on the CPU: src [N, ...] rows into cache [NB, BS, ...] (rows contiguous) at slots, in place;
    returns the bounds flags."""
    n = src.shape[0]
    s = src.to(cache.dtype).reshape(n, -1).contiguous()
    flags = torch.zeros(1, dtype=torch.int32)
    code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 5}[cache.dtype]
    lib = lib or library()
    st = lib.emu_cache_write(_ptr(s), s.stride(0) if n else 0, _ptr(cache), cache.stride(0), cache.stride(1),
                                   cache.shape[1], s.shape[1] if n else 1, code, _ptr(slots),
                                   DTYPE_CODES[slots.dtype], n, cache.shape[0] * cache.shape[1], _ptr(flags))
    _check(st, "cache_write_cuda", lib)
    return int(flags)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float, num_splits: int, chunk: int,
                 lib: ctypes.CDLL | None = None) -> tuple[torch.Tensor, int]:
    """csrc/attn_decode.cu on the CPU, argument order of dsmath_kernels.attention._decode_run: q [B, Hq, D],
    caches [NB, BS, Hkv, D | Dv] (v may be a view of k: MLA) -> (out [B, Hq, Dv] in q's dtype, bounds flags)."""
    B, Hq, D = q.shape
    Dv = v_cache.shape[-1]
    out = torch.full((B, Hq, Dv), float("nan"), dtype=q.dtype)
    po = torch.full((B, Hq, num_splits, Dv), float("nan")) if num_splits > 1 else None
    pl = torch.full((B, Hq, num_splits), float("nan")) if num_splits > 1 else None
    flags = torch.zeros(1, dtype=torch.int32)
    bt = block_tables.contiguous()
    lib = lib or library()
    st = lib.emu_paged_decode(
        _ptr(q), q.stride(0), q.stride(1), _ptr(k_cache), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        _ptr(v_cache), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), _ptr(bt), bt.stride(0),
        _ptr(seq_lens), _ptr(out), _ptr(po), _ptr(pl), DTYPE_CODES[q.dtype], B, Hq, k_cache.shape[2], D, Dv,
        k_cache.shape[1], scale, num_splits, chunk, bt.shape[1], k_cache.shape[0], _ptr(flags))
    _check(st, "paged_decode_cuda", lib)
    return out, int(flags)
