"""The compile sweep in CI: every Triton launch the launchers can make (every autotune config their prune functions
keep, every dtype and mode) compiled for sm_90 must fit the H100/H200's shared memory and registers, and 16-bit hot
loops must not spill; the sweep fails on known-bad configs, and its figures cache cannot hide a failure.

Compiled figures are cached by compile key (Triton + ptxas versions, kernel source, specialisation, options) in
tests/data/compile_report_sm90.json, read-only here: launches whose key is not in it are compiled (a changed kernel
or config, another Triton version), and a few cached entries are recompiled and must match. Refresh after changing
a kernel: `python -m dsmath_kernels.compile_report --cache tests/data/compile_report_sm90.json`."""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "tests", "data", "compile_report_sm90.json")
pytestmark = pytest.mark.skipif(tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 9),
                                reason="the compile report uses Triton >= 3.9's compile API")


def _run(code_or_args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter never compiles
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # import what this process imports
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else ["-m", "dsmath_kernels.compile_report",
                                                                        *code_or_args]
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if "ptxas" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("no ptxas in this triton install")
    return proc


def _json(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_launchable_config_fits_sm90():
    proc = _run(["--json", "--target", "sm_90", "--cache", CACHE, "--no-update", "--verify", "3"])
    r = _json(proc)
    bad = [row for row in r["rows"] if row["problems"]]
    assert proc.returncode == 0 and not bad, json.dumps(bad, indent=1)[:4000]
    rows = r["rows"]
    assert r["verified"] == 3
    assert len(rows) >= 150, len(rows)  # the sweep did not silently lose launches
    kernels = {row["kernel"] for row in rows}
    assert kernels >= {"_gemm_kernel", "_wgrad_kernel", "_combine_kernel", "_prefill_fwd_kernel",
                       "_decode_fwd_kernel", "_lse_fwd_kernel", "_lse_bwd_kernel"}, kernels
    assert {row["dtype"] for row in rows} >= {"bfloat16", "float16", "float32"}
    # the trainer's fp32 SwiGLU gate-up GEMM (an H100 crash before: 294,912 B of shared memory) is in the sweep
    gate_up = [row for row in rows if row["kernel"] == "_gemm_kernel" and row["dtype"] == "float32"
               and row["mode"] == "swiglu_train"]
    assert gate_up and all(row["smem"] <= 232448 for row in gate_up)
    # Hopper code where it matters: 16-bit GEMM / GRPO / prefill main loops with 64+ rows run wgmma, pipelined; so
    # do the FP8 GEMMs (issue 17), W8A8 on e4m3 operands, in every row bucket of their config tables
    fp8 = [row for row in rows if row["kernel"] == "_fp8_gemm_kernel" and row["dtype"] == "float8_e4m3fn"]
    assert {row["config"].split()[0] for row in fp8} == {"BM16", "BM64", "BM128"}, fp8
    assert "_quant_kernel" in kernels
    for row in rows:
        if row["dtype"] in ("bfloat16", "float16", "float8_e4m3fn") and row["kernel"] in (
                "_gemm_kernel", "_wgrad_kernel", "_lse_fwd_kernel", "_lse_bwd_kernel", "_fp8_gemm_kernel"):
            bm = int(row["config"].split()[0][2:]) if row["config"].startswith("BM") else 0
            if bm >= 64:
                assert row["mma"] == "wgmma" and row["pipelined"], row


BAD_SPEC = r"""
import sys, json, torch
from dsmath_kernels import compile_report as cr, grouped_gemm_triton as gg
import triton

def drive(run):  # the pre-fix configs: fp32 SwiGLU gate-up at 128 x 128 x 64, 4 stages (294,912 B of shared
    # memory), and the bf16 SwiGLU backward epilogue at 128 x 128 with 8 warps (1,212 B of spills)
    E, H, I, T, K = 64, 2048, 1408, 8192, 6
    m = cr._meta
    for dt, fn, args in ((torch.float32, gg.gate_up_train, lambda dt: (m(T, H, dtype=dt), m(E, 2 * I, H, dtype=dt),
                                                                      m(E + 1, dtype=torch.int32),
                                                                      m(T * K, dtype=torch.int32), K)),
                         (torch.bfloat16, gg.down_backward, lambda dt: (m(T * K, H, dtype=dt), m(E, H, I, dtype=dt),
                                                                        m(E + 1, dtype=torch.int32),
                                                                        m(T * K, 2 * I, dtype=dt)))):
        run("known-bad", fn, *args(dt))

bad = [triton.Config({"BM": 128, "BN": 128, "BK": 64}, num_warps=8, num_stages=4)]
gg._gemm_tuned.configs = bad
gg._gemm_tuned.early_config_prune = lambda configs, named, **kw: configs
cr.SPECS[:] = [cr.KernelSpec("bad", "dsmath_kernels.grouped_gemm_triton", ("_gemm_tuned",), drive,
                             {"_gemm_kernel": 0})]
sys.exit(cr.main(["--json", "--jobs", "1"]))
"""


def test_sweep_fails_on_known_bad_configs():
    proc = _run(BAD_SPEC)
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = _json(proc)["rows"]
    problems = {row["dtype"]: " ".join(row["problems"]) for row in rows}
    assert "shared memory 294912 B > 232448 B" in problems["float32"], problems
    assert "spills" in problems["bfloat16"] and "budget 0 B" in problems["bfloat16"], problems


def test_cache_cannot_hide_a_failure(tmp_path):
    """An edited cache entry (a launch that does not fit recorded as fitting) is caught by the verification."""
    only = ["--only", "_combine_kernel", "--json", "--no-update"]
    rows = _json(_run([*only, "--cache", CACHE]))["rows"]
    assert rows and all("key" in row for row in rows)
    with open(CACHE) as f:
        cache = json.load(f)
    victim = rows[0]["key"]
    assert victim in cache, "refresh tests/data/compile_report_sm90.json (see the module docstring)"
    cache[victim] = dict(cache[victim], smem=1024, regs=32)
    bad = tmp_path / "cache.json"
    bad.write_text(json.dumps(cache))
    proc = _run([*only, "--cache", str(bad), "--verify", str(len(rows))])
    r = _json(proc)
    assert proc.returncode == 1, r
    assert any("cache entry differs" in " ".join(row["problems"]) for row in r["rows"] if row["key"] == victim)
