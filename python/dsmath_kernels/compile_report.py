"""Compile sweep of every Triton kernel for a GPU target, without a GPU:
`python -m dsmath_kernels.compile_report [--target sm_90|sm_80|all] [--json] [--only TEXT] [--jobs N]`.

For each kernel family it calls the real launchers with meta tensors (shapes of DeepSeek-V2-Lite / V3 / Qwen3-MoE
layers, every dtype and mode the public ops launch them with) and records each launch instead of running it; an
autotuned launch expands into every config its prune function keeps for that call. Each distinct launch is then
specialised exactly as Triton's launcher would (Triton's own binder: 16-byte aligned pointers, ints equal to 1 or
divisible by 16) and compiled for the target. Per config the table gives registers per thread, spill bytes
(ptxas stores + loads), shared memory, the MMA the main loop uses (wgmma on sm_90, mma.sync, or plain fma: fp32
operands run exact IEEE dots, without tensor cores), whether loads are pipelined (cp.async, JSON only) and whether
it fits the target: shared memory within the per-block limit, registers x threads within the register
file. Compile-time figures only: nothing runs.

Failures (exit status 1, and the CI test tests/test_compile_report.py): a launcher-selectable config that does not
fit, or a 16-bit launch of a hot loop that spills more than its kernel's budget (`spill_budget` of its spec,
stated below with the spec). fp32 launches report spills but are not held to the budget (fp32 tiles are twice the
registers; they are the trainer's default and must fit, not be fast).

Adding a kernel (another module's Triton kernel, say a new decode kernel):
    from dsmath_kernels import compile_report
    compile_report.register(compile_report.KernelSpec(
        family="my_decode", module="dsmath_kernels.my_decode", kernels=("_my_kernel",),
        drive=my_drive, spill_budget={"_my_kernel": 0}))
where `kernels` are the module attributes the launcher calls (a JITFunction or an Autotuner) and `drive(run)`
calls the launcher with meta tensors through `run(mode, launcher, *args, **kwargs)` once per mode and dtype it can
be launched with (mode: a label, or a function of the launch's keyword arguments for a launcher that launches
several kernels; `run(..., min_cc=89)` marks launches made only on that compute capability or newer, e.g. e4m3
operands, which the sweep then skips for older targets). Put the module in PLUGINS (below) so the sweep imports it.
A section with other rows (the CUDA kernels' ptxas figures, say) is added with `register_section(name, fn)`,
fn(target) -> list of row dicts with at least "kernel" and "problems" keys.

Needs triton >= 3.9 (its compile API); importing this module does not import triton."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

# name -> (compute capability, max shared memory per block in bytes (opt-in), 32-bit registers per SM / block)
TARGETS = {
    "sm_90": (90, 232448, 65536),
    "sm_80": (80, 166912, 65536),
}
PLUGINS: tuple[str, ...] = ()  # modules that call register() at import (kernels added by other families)


@dataclass
class KernelSpec:
    """A family of Triton kernels and how to drive their launchers. spill_budget: per kernel (function name) the
    spill bytes a 16-bit launch may have; a kernel missing from it is not a hot loop (spills reported only)."""

    family: str
    module: str
    kernels: tuple[str, ...]
    drive: Callable[[Callable], None]
    spill_budget: dict[str, int] = field(default_factory=dict)


@dataclass
class Variant:
    family: str
    mode: str
    fn: object  # JITFunction
    args: tuple
    kwargs: dict
    spill_budget: int | None
    min_cc: int = 0  # launched only on targets of this compute capability or newer

    @property
    def kernel(self) -> str:
        return self.fn.__name__

    @property
    def dtype(self) -> str:
        for a in self.args:
            if isinstance(a, torch.Tensor) and a.dtype.is_floating_point:
                return str(a.dtype).replace("torch.", "")
        return "-"


SPECS: list[KernelSpec] = []
SECTIONS: list[tuple[str, Callable[[str], list[dict]]]] = []
_CONFIG_KEYS = ("BM", "BN", "BK", "BLOCK_M", "BLOCK_N", "BLOCK_H", "BH")


def register(spec: KernelSpec) -> None:
    SPECS[:] = [s for s in SPECS if s.family != spec.family] + [spec]


def register_section(name: str, fn: Callable[[str], list[dict]]) -> None:
    SECTIONS[:] = [s for s in SECTIONS if s[0] != name] + [(name, fn)]


# ---------------------------------------------------------------------------------------------- capture
class _Recorder:
    """Stands in for a JITFunction or Autotuner: `rec[grid](*args, **kwargs)` records the launch(es) it would make."""

    def __init__(self, obj, sink: list, state: dict):
        self.obj, self.sink, self.state = obj, sink, state

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        obj = self.obj
        configs = getattr(obj, "configs", None)
        mode = self.state["mode"]
        if callable(mode):  # a launcher that launches twice: its label from the launch's flags
            mode = mode(kwargs)
        if configs is None:  # plain @triton.jit
            self.sink.append((mode, obj, args, dict(kwargs), self.state["min_cc"]))
            return
        fn = obj.fn  # Autotuner -> JITFunction
        prune = getattr(obj, "early_config_prune", None)
        named = dict(zip(fn.arg_names, args))
        kept = prune(configs, named, **kwargs) if prune else configs
        for cfg in kept:
            self.sink.append((mode, fn, args, {**kwargs, **cfg.all_kwargs()}, self.state["min_cc"]))


def collect(specs: Iterable[KernelSpec]) -> list[Variant]:
    """Drive every spec's launchers with meta tensors and return the launches they would make."""
    out: list[Variant] = []
    for spec in specs:
        mod = importlib.import_module(spec.module)
        sink: list = []
        state = {"mode": "", "min_cc": 0}
        saved = {name: getattr(mod, name) for name in spec.kernels}

        def run(mode, launcher, *args, min_cc=0, **kwargs):
            state["mode"], state["min_cc"] = mode, min_cc
            return launcher(*args, **kwargs)

        try:
            for name, obj in saved.items():
                setattr(mod, name, _Recorder(obj, sink, state))
            spec.drive(run)
        finally:
            for name, obj in saved.items():
                setattr(mod, name, obj)
        for mode, fn, args, kwargs, min_cc in sink:
            out.append(Variant(spec.family, mode, fn, args, kwargs, spec.spill_budget.get(fn.__name__), min_cc))
    return out


# ---------------------------------------------------------------------------------------------- compile
def _specialise(v: Variant, target):
    """Triton's own launch-time specialisation of the recorded call -> (src, options, key). The key hashes everything
    the compiled code depends on: Triton and ptxas versions, target, the kernel's source and the jit functions it
    calls (fn.cache_key), signature, constants, attributes and options."""
    import hashlib

    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    kw = dict(v.kwargs)
    kw.setdefault("debug", False)
    binder = create_function_from_signature(v.fn.signature, v.fn.params, backend)
    bound, spec, opts = binder(*v.args, **kw)
    opts, sig, consts, attrs = v.fn._pack_args(backend, kw, bound, spec, opts)
    options = {k: val for k, val in opts.__dict__.items() if k != "extern_libs"}  # extern_libs: install paths
    text = repr((triton.__version__, backend.hash(), v.fn.__name__, v.fn.cache_key, sorted(sig.items()),
                 sorted(consts.items(), key=str), sorted(attrs.items(), key=str), sorted(options.items(), key=str)))
    return ASTSource(v.fn, sig, consts, attrs), opts, hashlib.sha256(text.encode()).hexdigest()[:24]


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill": re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads"),
}


def _mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma"
    return "fma"


def _mode_str(v: Variant) -> str:
    flags = [k for k, val in v.kwargs.items() if val is True and k not in ("IEEE", "UPCAST")]
    return v.mode or ",".join(flags) or "-"


def measure(v: Variant, target_name: str) -> dict:
    """Compile one launch for the target: raw figures {regs, spill, smem, mma, warps, key}."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile as tcompile

    cc = TARGETS[target_name][0]
    target = GPUTarget("cuda", cc, 32)
    src, opts, key = _specialise(v, target)
    buf = io.StringIO()
    old = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(buf):
            k = tcompile(src, target=target, options=opts.__dict__)
    finally:
        knobs.nvidia.dump_ptxas_log = old
    log = buf.getvalue()
    ptx = k.asm["ptx"]
    if not _PTXAS_RE["regs"].search(log):  # Triton's cache answered: sweep() points it at an empty directory
        raise RuntimeError("no ptxas log (Triton's kernel cache answered)")
    return {"key": key, "regs": int(_PTXAS_RE["regs"].search(log).group(1)),
            "spill": sum(int(x) for x in _PTXAS_RE["spill"].search(log).groups()), "smem": int(k.metadata.shared),
            "mma": _mma_kind(ptx), "pipelined": "cp.async" in ptx, "warps": opts.num_warps,
            "stages": opts.num_stages}


def judge(v: Variant, target_name: str, m: dict) -> dict:
    """A table row from raw figures: fits the target? within the spill budget?"""
    _, smem_max, regfile = TARGETS[target_name]
    regs, spill, smem = m["regs"], m["spill"], m["smem"]
    threads = 32 * m["warps"]
    problems = []
    if smem > smem_max:
        problems.append(f"shared memory {smem} B > {smem_max} B")
    if regs * threads > regfile:
        problems.append(f"{regs} registers x {threads} threads > {regfile}")
    if v.spill_budget is not None and v.dtype in ("bfloat16", "float16") and spill > v.spill_budget:
        problems.append(f"spills {spill} B > budget {v.spill_budget} B")
    config = " ".join([f"{k}{v.kwargs[k]}" for k in _CONFIG_KEYS if k in v.kwargs] +
                      [f"w{m['warps']}", f"s{m['stages']}"])
    return {"target": target_name, "family": v.family, "kernel": v.kernel, "mode": _mode_str(v), "dtype": v.dtype,
            "config": config, "regs": regs, "spill": spill, "smem": smem, "mma": m["mma"],
            "pipelined": m["pipelined"], "fits": smem <= smem_max and regs * threads <= regfile,
            "budget": v.spill_budget, "problems": problems}


_JOBS: list = []  # (variant, target) inherited by forked workers


def _work(i: int) -> dict:
    v, t = _JOBS[i]
    try:
        return measure(v, t)
    except Exception as e:  # a config that does not compile is a failure of the sweep, reported as a row
        return {"error": f"compile error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


def _error_row(v: Variant, t: str, err: str) -> dict:
    return {"target": t, "family": v.family, "kernel": v.kernel, "mode": _mode_str(v), "dtype": v.dtype,
            "config": str({k: v.kwargs[k] for k in _CONFIG_KEYS if k in v.kwargs}), "regs": None, "spill": None,
            "smem": None, "mma": None, "fits": False, "budget": v.spill_budget, "problems": [err]}


def _run_jobs(n: int, jobs: int) -> list[dict]:
    if n == 0:
        return []
    jobs = max(1, min(jobs, n))
    if jobs == 1:
        return [_work(i) for i in range(n)]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as ex:
        return list(ex.map(_work, range(n), chunksize=1))


def sweep(targets: Iterable[str], only: str | None = None, jobs: int | None = None,
          specs: Iterable[KernelSpec] | None = None, cache: str | None = None, verify: int = 0,
          stats: dict | None = None) -> list[dict]:
    """Compile every distinct launch for each target; one row per (target, launch). cache: a JSON file of raw
    figures by compile key (read, and written back with new entries); verify: recompile that many cached entries
    (chosen by key) and fail on any difference, so a stale or edited cache cannot pass."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_report: unset TRITON_INTERPRET (the interpreter never compiles)")
    for m in PLUGINS:
        importlib.import_module(m)
    from triton.backends.compiler import GPUTarget

    # a private, empty Triton cache: every compile runs ptxas (its log gives registers and spills, with exactly the
    # flags Triton uses), and nothing of this sweep lands in the user's cache
    tmp_cache = tempfile.mkdtemp(prefix="dsmath_compile_report_")
    os.environ["TRITON_CACHE_DIR"] = tmp_cache
    try:
        from triton import knobs

        knobs.cache.dir = tmp_cache
    except Exception:  # noqa: BLE001 - older knobs: the environment variable does it
        pass
    variants = collect(SPECS if specs is None else specs)
    if only:
        variants = [v for v in variants if only in f"{v.family} {v.kernel} {_mode_str(v)} {v.dtype}"]
    known: dict = {}
    if cache and os.path.exists(cache):
        with open(cache) as f:
            known = json.load(f)
    launches, seen = [], set()  # (variant, target, key) in table order, each key once
    for t in targets:
        target = GPUTarget("cuda", TARGETS[t][0], 32)
        for v in variants:
            if TARGETS[t][0] < v.min_cc:
                continue
            key = _specialise(v, target)[2]
            if key not in seen:
                seen.add(key)
                launches.append((v, t, key))
    todo = [x for x in launches if x[2] not in known]
    checks = sorted((x for x in launches if x[2] in known), key=lambda x: x[2])[:verify]
    _JOBS[:] = [(v, t) for v, t, _ in todo + checks]
    try:
        results = _run_jobs(len(_JOBS), jobs or os.cpu_count() or 1)
    finally:
        import shutil

        shutil.rmtree(tmp_cache, ignore_errors=True)
    fresh = dict(zip([k for _, _, k in todo + checks], results))
    rows = []
    for v, t, key in launches:
        m = fresh[key] if key in fresh else known[key]
        if "error" in m:
            rows.append(_error_row(v, t, m["error"]))
            continue
        row = judge(v, t, m)
        row["key"] = key
        if key in known and key in fresh and "error" not in fresh[key]:
            got = {k: fresh[key][k] for k in ("regs", "spill", "smem", "mma", "pipelined")}
            want = {k: known[key].get(k) for k in ("regs", "spill", "smem", "mma", "pipelined")}
            if got != want:
                row["problems"].append(f"cache entry differs from a fresh compile: cached {want}, compiled {got}")
        rows.append(row)
    if stats is not None:
        stats.update(launches=len(launches), compiled=len(todo), verified=len(checks))
    if cache and (todo or (not only and set(known) - seen)):
        known.update({k: m for k, m in fresh.items() if "error" not in m})
        if not only:  # a full sweep: drop the figures of launches that no longer exist
            known = {k: m for k, m in known.items() if k in seen}
        with open(cache + ".tmp", "w") as f:
            json.dump(dict(sorted(known.items())), f, indent=0, sort_keys=True)
        os.replace(cache + ".tmp", cache)
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'kernel':<19} {'mode':<13} {'dtype':<9} {'config':<28} {'regs':>4} {'spill':>5} {'smem KB':>7} " \
           f"{'mma':<5} fits"
    lines = [head, "-" * len(head)]
    for r in rows:
        smem = "-" if r["smem"] is None else f"{r['smem'] / 1024:.1f}"
        fits = "yes" if not r["problems"] else "NO: " + "; ".join(r["problems"])
        lines.append(f"{r['kernel']:<19} {r['mode']:<13} {r['dtype']:<9} {r['config']:<28} {r['regs'] or '-':>4} "
                     f"{'-' if r['spill'] is None else r['spill']:>5} {smem:>7} {r['mma'] or '-':<5} {fits}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsmath_kernels.compile_report", description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="sm_90", choices=[*TARGETS, "all"])
    ap.add_argument("--json", action="store_true", help="one JSON object: rows and failures")
    ap.add_argument("--only", default=None, help="keep launches whose family/kernel/mode/dtype contain TEXT")
    ap.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    ap.add_argument("--cache", default=None, help="JSON file of compiled figures by compile key (read and updated)")
    ap.add_argument("--no-update", action="store_true", help="do not write new entries into --cache")
    ap.add_argument("--verify", type=int, default=0, help="recompile N cached entries and fail on a difference")
    ap.add_argument("--cuda", action="store_true", help="add the csrc/*.cu kernels' ptxas figures (nvcc, ~1 min)")
    a = ap.parse_args(argv)
    if a.cuda:
        register_section("CUDA kernels (nvcc --resource-usage, cuobjdump -sass)", cuda_section)
    targets = list(TARGETS) if a.target == "all" else [a.target]
    stats: dict = {}
    cache = a.cache
    if cache and a.no_update:  # read-only: work on a copy
        import shutil

        tmp = tempfile.mkdtemp()
        if os.path.exists(cache):
            shutil.copy(cache, os.path.join(tmp, "cache.json"))
        cache = os.path.join(tmp, "cache.json")
    rows = sweep(targets, a.only, a.jobs, cache=cache, verify=a.verify, stats=stats)
    for t in targets:
        for name, fn in SECTIONS:
            rows += [{"target": t, "section": name, **r} for r in fn(t)]
    bad = [r for r in rows if r["problems"]]
    if a.json:
        print(json.dumps({"rows": rows, "failures": len(bad), **stats}))
    else:
        for t in targets:
            sub = [r for r in rows if r["target"] == t and "section" not in r]
            print(f"# {t}: {len(sub)} Triton launches (compile-time figures)")
            print(format_table(sub))
            for name, _ in SECTIONS:
                sec = [r for r in rows if r["target"] == t and r.get("section") == name]
                print(f"\n# {t}: {name}")
                for r in sec:
                    extra = "  ".join(f"{k}={v}" for k, v in r.items()
                                      if k not in ("target", "section", "kernel", "problems", "file"))
                    state = "NO: " + "; ".join(r["problems"]) if r["problems"] else "ok"
                    print(f"  {r.get('file', ''):<16} {r['kernel']:<44} {extra}  {state}")
        print(f"\n{len(bad)} failing of {len(rows)} ({stats.get('compiled', 0)} compiled, "
              f"{stats.get('verified', 0)} cached entries verified)")
    return 1 if bad else 0


# ---------------------------------------------------------------------------------------------- CUDA section
def cuda_section(target: str, files: Iterable[str] | None = None, csrc: str | None = None) -> list[dict]:
    """ptxas figures of every kernel in csrc/*.cu (or only `files`, names in csrc/) for the target (nvcc
    --resource-usage: registers, stack frame, spills, static shared memory) and the tensor-core instructions of its
    SASS (cuobjdump -sass: HGMMA / HMMA / IMMA counts). Needs the repository's csrc/ and nvcc; a problem when a
    kernel uses local memory (a stack frame: per-thread arrays or spills) or more than 48 KiB static shared
    memory. `csrc`: the sources' directory (default: the checkout this module runs from; an installed package
    has none, so tests pass the repository's)."""
    import shutil

    csrc = csrc or os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
    nvcc = shutil.which("nvcc")
    if not os.path.isdir(csrc) or nvcc is None:
        return [{"kernel": "-", "problems": ["needs the repository's csrc/ and nvcc"]}]
    try:
        from triton import knobs

        cuobjdump = knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001 - SASS counts are optional
        cuobjdump = shutil.which("cuobjdump")
    cc = TARGETS[target][0]
    arch = f"sm_{cc}a" if cc == 90 else f"sm_{cc}"
    rows = []
    for f in sorted(os.listdir(csrc)):
        if not f.endswith(".cu") or (files is not None and f not in files):
            continue
        with tempfile.TemporaryDirectory() as d:
            cubin = os.path.join(d, "k.cubin")
            proc = subprocess.run([nvcc, f"-arch={arch}", "-O3", "--expt-relaxed-constexpr", "-cubin",
                                   f"-I{os.path.join(csrc, 'include')}", "--resource-usage",
                                   os.path.join(csrc, f), "-o", cubin], capture_output=True, text=True)
            if proc.returncode:
                rows.append({"kernel": f, "problems": [f"nvcc failed: {proc.stderr.strip()[-300:]}"]})
                continue
            sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True).stdout \
                if cuobjdump else ""
        counts: dict[str, dict] = {}
        for block in sass.split("Function : ")[1:]:
            name = block.split("\n", 1)[0].strip()
            counts[name] = {k: len(re.findall(rf"\b{k}\b", block)) for k in ("HGMMA", "HMMA", "IMMA")}
        log, cur = proc.stdout + proc.stderr, None
        for line in log.splitlines():
            m = re.search(r"Compiling entry function '(\w+)'", line)
            if m:
                cur = {"file": f, "mangled": m.group(1)}
                rows.append(cur)
            elif cur is not None and (m := _PTXAS_RE["spill"].search(line)):
                cur["spill"] = int(m.group(1)) + int(m.group(2))
                st = re.search(r"(\d+) bytes stack frame", line)
                cur["stack"] = int(st.group(1)) if st else 0
            elif cur is not None and (m := _PTXAS_RE["regs"].search(line)):
                cur["regs"] = int(m.group(1))
                sm = re.search(r"(\d+) bytes smem", line)
                cur["smem"] = int(sm.group(1)) if sm else 0
    names = subprocess.run(["c++filt"], input="\n".join(r.get("mangled", "") for r in rows), capture_output=True,
                           text=True).stdout.splitlines() if shutil.which("c++filt") else []
    for i, r in enumerate(rows):
        if "mangled" not in r:
            continue
        full = (names[i] if i < len(names) else r["mangled"]).replace("(anonymous namespace)::", "").split("(")[0]
        head, lt, tail = full.partition("<")
        r["kernel"] = head.rsplit("::", 1)[-1] + lt + tail
        tc = counts.get(r["mangled"], {})
        r["mma"] = ",".join(f"{k}x{v}" for k, v in tc.items() if v) or "fma"
        r["problems"] = ([f"spills {r['spill']} B"] if r.get("spill") else []) + \
            ([f"local memory: {r['stack']} B stack frame"] if r.get("stack") else []) + \
            ([f"static shared memory {r['smem']} B > 48 KiB"] if r.get("smem", 0) > 48 * 1024 else [])
        del r["mangled"]
    return rows


# ---------------------------------------------------------------------------------------------- built-in specs
def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype)


DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _drive_grouped_gemm(run) -> None:
    from dsmath_kernels import grouped_gemm_triton as gg

    i32 = torch.int32
    H, I, E, K = 2048, 1408, 64, 6  # noqa: E741 - DeepSeek-V2-Lite expert layer
    for dt in DTYPES:
        w_gu, w_dn = _meta(E, 2 * I, H, dtype=dt), _meta(E, H, I, dtype=dt)
        for T in (64, 512, 8192):  # rows per expert 6 / 48 / 768: the three BM buckets of _prune_gemm
            R = T * K
            x, off, order = _meta(T, H, dtype=dt), _meta(E + 1, dtype=i32), _meta(R, dtype=i32)
            weights = _meta(T, K, dtype=torch.float32)
            run("plain", gg.grouped_gemm, _meta(R, H, dtype=dt), w_gu, off)
            run("dx", gg.grouped_gemm, _meta(R, 2 * I, dtype=dt), w_gu.transpose(1, 2), off)
            run(lambda kw: "swiglu" if kw["ACT"] else "down+scale", gg.moe_experts_fused, x, w_gu, w_dn, weights,
                order, off)
            run("swiglu_train", gg.gate_up_train, x, w_gu, off, order, K)
            run("dact", gg.down_backward, _meta(R, H, dtype=dt), w_dn, off, _meta(R, 2 * I, dtype=dt))
            run("wgrad", gg.grouped_wgrad, _meta(R, H, dtype=dt), _meta(R, I, dtype=dt), off, E)
            run("wgrad_gather", gg.grouped_wgrad, _meta(R, 2 * I, dtype=dt), x, off, E, order, K)
        run("combine", gg.combine, _meta(64 * K, H, dtype=dt), _meta(64, K, dtype=i32), _meta(64, K))


def _drive_attention(run) -> None:
    from dsmath_kernels import attention_triton as at

    i32 = torch.int32
    B, NB, BS = 8, 512, 64
    bt, sl, cu = _meta(B, 64, dtype=i32), _meta(B, dtype=i32), _meta(B + 1, dtype=i32)
    for dt in DTYPES:
        for D, Hq, Hkv in ((64, 32, 8), (128, 32, 4), (192, 16, 16), (256, 16, 8)):  # GQA / MHA head dims
            kc, vc = _meta(NB, BS, Hkv, D, dtype=dt), _meta(NB, BS, Hkv, D, dtype=dt)
            for causal in (True, False):
                run("causal" if causal else "full", at.paged_prefill_triton, _meta(4096, Hq, D, dtype=dt), kc, vc,
                    bt, cu, sl, 0.1, causal, 1024)
            run(f"G{Hq // Hkv}", at.paged_decode_triton, _meta(B, Hq, D, dtype=dt), kc, vc, bt, sl, 0.1, 4, 256)
        kv = _meta(NB, BS, 576, dtype=dt).unsqueeze(2)  # absorbed MLA: 512 latent + 64 rope, values = latent
        for H in (16, 128):  # V2-Lite, V3
            run("mla causal", at.paged_prefill_triton, _meta(4096, H, 576, dtype=dt), kv, kv[..., :512], bt, cu, sl,
                0.1, True, 1024)
            run(f"mla G{H}", at.paged_decode_triton, _meta(B, H, 576, dtype=dt), kv, kv[..., :512], bt, sl, 0.1, 4,
                256)


def _drive_grpo(run) -> None:
    from dsmath_kernels import grpo_triton as gt

    N, H, V = 8192, 2048, 102400  # V2-Lite LM head, 8k tokens
    for dt in DTYPES:
        h, w, t = _meta(N, H, dtype=dt), _meta(V, H, dtype=dt), _meta(N, dtype=torch.int64)
        lse, g = _meta(N, dtype=torch.float32), _meta(N, dtype=torch.float32)
        run("fwd", gt.lse_forward, h, w, t, 1.0)
        run("bwd split", gt.lse_backward, h, w, t, lse, g, 1.0, True, True, "split")
        for dh, dw in ((True, True), (True, False), (False, True)):
            run("bwd fused", gt.lse_backward, h, w, t, lse, g, 1.0, dh, dw, "fused")


def _drive_fp8(run) -> None:
    """The FP8 block-scaled GEMMs (issue 17) at DeepSeek-V3 shapes: dense (q_a_proj-like) and the MoE pair (gate-up
    with the SwiGLU (+ e4m3 re-quantisation) epilogue, down with the routing weight) at decode / small-prefill /
    prefill rows per expert, and the activation quantiser. W8A8 and the weight-only launches with e4m3 weight
    pointers are sm_89+ (min_cc=89: wgmma e4m3 on sm_90); the weight-only launches with the weight as bytes decoded
    in-kernel are what sm_80 runs (and compile for sm_90 too)."""
    from dsmath_kernels import fp8_gemm_triton as ft

    f8, i32, f32, bf = torch.float8_e4m3fn, torch.int32, torch.float32, torch.bfloat16
    H, N, I, E, K = 7168, 1536, 2048, 32, 8  # noqa: E741 - V3: one EP-8 rank's 32 experts, top-8
    w, ws = _meta(1, N, H, dtype=f8), _meta(1, N // 128, H // 128, dtype=f32)
    w13, s13 = _meta(E, 2 * I, H, dtype=f8), _meta(E, 2 * I // 128, H // 128, dtype=f32)
    w2, s2 = _meta(E, H, I, dtype=f8), _meta(E, H // 128, I // 128, dtype=f32)
    for M in (8, 32, 128, 8192):  # tokens: every row bucket of configs_for (rows per group <= 16, <= 64, more) for
        # the dense GEMM (M rows, one group) and the MoE pair (8 M rows over 32 experts)
        a, a_s = _meta(M, H, dtype=f8), _meta(M, H // 128, dtype=f32)
        run("dense w8a8", ft.gemm, a, w, ws, a_scale=a_s, native=True, min_cc=89)
        for dt in (bf, torch.float16):
            run("dense w8a16", ft.gemm, _meta(M, H, dtype=dt), w, ws, out_dtype=dt, native=True, w_bits=False,
                min_cc=89)
            run("dense w8a16 bytes", ft.gemm, _meta(M, H, dtype=dt), w, ws, out_dtype=dt, native=False, w_bits=True)
        R = M * K  # pairs
        off, order, rw = _meta(E + 1, dtype=i32), _meta(R, dtype=i32), _meta(R, dtype=f32)
        run("gate_up swiglu quant", ft.gemm, a, w13, s13, off, a_scale=a_s, rows=order, topk=K, act=True,
            up_blocks=I // 128, quant_out=True, native=True, min_cc=89)
        run("down routed", ft.gemm, _meta(R, I, dtype=f8), w2, s2, off, a_scale=_meta(R, I // 128, dtype=f32),
            rows=order, gather=False, route_w=rw, native=True, min_cc=89)
        xb = _meta(M, H, dtype=bf)
        for bits in (False, True):
            sfx, cc = (" bytes", 0) if bits else ("", 89)
            run("gate_up swiglu w8a16" + sfx, ft.gemm, xb, w13, s13, off, rows=order, topk=K, act=True,
                up_blocks=I // 128, native=not bits, w_bits=bits, min_cc=cc)
            run("down routed w8a16" + sfx, ft.gemm, _meta(R, I, dtype=bf), w2, s2, off, rows=order, gather=False,
                route_w=rw, native=not bits, w_bits=bits, min_cc=cc)
        run("quantize", ft.quantize, xb, min_cc=89)


# Spill budgets (bytes per thread, 16-bit launches): 0 everywhere — every hot loop must live in registers.
register(KernelSpec("grouped_gemm", "dsmath_kernels.grouped_gemm_triton", ("_gemm_tuned", "_wgrad_tuned",
                                                                          "_combine_kernel"),
                    _drive_grouped_gemm, {"_gemm_kernel": 0, "_wgrad_kernel": 0}))
register(KernelSpec("attention", "dsmath_kernels.attention_triton", ("_prefill_fwd_kernel", "_decode_fwd_kernel"),
                    _drive_attention, {"_prefill_fwd_kernel": 0, "_decode_fwd_kernel": 0}))
register(KernelSpec("grpo", "dsmath_kernels.grpo_triton", ("_lse_fwd_kernel", "_lse_bwd_kernel"), _drive_grpo,
                    {"_lse_fwd_kernel": 0, "_lse_bwd_kernel": 0}))
register(KernelSpec("fp8", "dsmath_kernels.fp8_gemm_triton", ("_tuned", "_quant_kernel"), _drive_fp8,
                    {"_fp8_gemm_kernel": 0}))


def _drive_tiled_decode(run) -> None:
    """Issue 16's tensor-core MLA / GQA decode (plain, suffix and shared-prefix passes, merge): its own drive, imported
    when the sweep runs (importing this module does not import triton)."""
    from dsmath_kernels.mla_decode_triton import drive_compile_sweep

    drive_compile_sweep(run)


register(KernelSpec("tiled_decode", "dsmath_kernels.mla_decode_triton", ("_attend_kernel", "_merge_kernel"),
                    _drive_tiled_decode, {"_attend_kernel": 0}))


if __name__ == "__main__":
    sys.exit(main())
