"""The tensor-core MLA decode kernel (mla_decode_triton.py) beyond the interpreter: compiled for sm_90 on this
machine, its main loops must run on wgmma (HGMMA in the SASS) with no spills at V2-Lite's 16 and V3's 128 heads
and in the shared-prefix tile; on a GPU, V2-Lite / V3 shapes against float64 dense attention for page sizes
16 / 32 / 64 / 128, plain and cascade, and a CUDA-graph-captured cascade decode."""

import os
import subprocess
import sys

import pytest
import torch

import dsmath_kernels as dk
from dsmath_kernels.reference.attention import fork_tables, paginate_like
from dsmath_kernels.testing import assert_close

SMEM_SM90 = 227 * 1024


def _compile_all():
    """Run in a subprocess without TRITON_INTERPRET: compile the kernel specs, print one line per spec."""
    import json

    from dsmath_kernels import mla_decode_triton as m

    for name in ("mla_h16_bf16", "mla_h128_bf16", "mla_shared_h16_bf16"):
        print(json.dumps(m.compile_sm90(name, page_size=64)))


@pytest.mark.slow
def test_compiles_for_sm90_wgmma_main_loop_no_spills():
    pytest.importorskip("triton")
    from dsmath_kernels.compile_report_cuda import cuobjdump

    if cuobjdump() is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton's bundled copy)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    code = (f"import importlib.util as u; s = u.spec_from_file_location('t', {__file__!r}); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); m._compile_all()")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [x["kernel"] for x in rows] == ["mla_h16_bf16", "mla_h128_bf16", "mla_shared_h16_bf16"]
    for x in rows:
        assert x["main_loop_hgmma"] > 0 and x["main_loop_hmma"] == 0, x  # wgmma, not mma.sync
        assert x["main_loop_cp_async"] > 0, x  # KV tiles stream in asynchronously
        assert x["stack"] == 0 and x["local_instructions"] == 0, x  # no spills anywhere
        assert x["shared_bytes"] <= SMEM_SM90 and x["registers"] <= 255, x
    assert rows[0]["trans"] and not rows[1]["trans"]  # 16 heads: S^T = K Q^T (the KV tile is wgmma's M)


# ---------------------------------------------------------------------------------------------- GPU
def _dense(q, rows, Dc, scale):
    out = torch.zeros(q.shape[0], q.shape[1], Dc, dtype=torch.float64)
    for b, r in enumerate(rows):
        if r.shape[0]:
            p = torch.softmax(q[b].double().cpu() @ r.double().T * scale, -1)
            out[b] = p @ r.double()[:, :Dc]
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("page", [16, 32, 64, 128])
@pytest.mark.parametrize("H", [16, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mla_tc_deepseek_shapes(H, page, dtype):
    """Plain and cascade decode at real shapes: 5 samples of a 1000-token prompt (mid-block) + a 4097-token loner
    + an empty sequence."""
    torch.manual_seed(0)
    lens = [1000 + s for s in (1, 64, 300, 0, 17)]
    bt, nb = fork_tables(1000, lens, page)
    shared = torch.randn(1000, 576)
    rows = [torch.cat([shared, torch.randn(L - 1000, 576)]).to(dtype) for L in lens]
    own = torch.arange(nb, nb + -(-4097 // page), dtype=torch.int32)
    W = max(bt.shape[1], own.shape[0])
    bt = torch.nn.functional.pad(bt, (0, W - bt.shape[1]), value=2**30)
    bt = torch.cat([bt, torch.nn.functional.pad(own, (0, W - own.shape[0]), value=2**30)[None],
                    torch.full((1, W), 2**30, dtype=torch.int32)])
    rows += [torch.randn(4097, 576).to(dtype), torch.zeros(0, 576, dtype=dtype)]
    lens += [4097, 0]
    kv = paginate_like(rows, bt, nb + own.shape[0], page).cuda()
    q = torch.randn(len(lens), H, 576).to(dtype)
    sl = torch.tensor(lens, dtype=torch.int32)
    expect = _dense(q, rows, 512, 576**-0.5)
    sp = dk.shared_prefix(bt, lens, page, num_q_heads=H, device="cuda")
    assert sp is not None
    tol = 1.6e-2 if dtype == torch.bfloat16 else 2e-3
    for cascade in (None, sp):
        for plan in (None, dk.DecodePlan(1, 1 << 20, 4097), dk.DecodePlan(9, 512, 4097)):
            out = dk.mla_decode(q.cuda(), kv, bt.cuda(), sl.cuda(), 576**-0.5, v_head_dim=512, plan=plan,
                                cascade=cascade)
            assert_close(out, expect, atol=tol, rtol=tol, name=f"H{H} page {page} cascade {cascade is not None}")


@pytest.mark.gpu
def test_cascade_decode_in_a_cuda_graph():
    torch.manual_seed(0)
    lens = [700 + s for s in range(16)]
    bt, nb = fork_tables(700, lens, 64)
    shared = torch.randn(700, 576)
    rows = [torch.cat([shared, torch.randn(L - 700, 576)]).bfloat16() for L in lens]
    kv = paginate_like(rows, bt, nb, 64).cuda()
    q = torch.randn(16, 16, 576).bfloat16().cuda()
    bt_d, sl = bt.cuda(), torch.tensor(lens, dtype=torch.int32, device="cuda")
    sp = dk.shared_prefix(bt, lens, 64, num_q_heads=16, device="cuda", pad_to=16)
    plan = dk.plan_decode(16, 4096, num_kv_heads=1, num_q_heads=16, device="cuda", tiled=True)
    f = lambda: dk.mla_decode(q, kv, bt_d, sl, 576**-0.5, v_head_dim=512, plan=plan, cascade=sp)  # noqa: E731
    eager = f()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = f()
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    assert_close(out, _dense(q.cpu(), rows, 512, 576**-0.5), atol=1.6e-2, rtol=1.6e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("H", [16, 128])
def test_gpu_tiled_decode_flags_bad_ids(H, monkeypatch):
    """Principle 4 on the default MLA path (the Triton tiled kernel): no host sync in the call, a bad block id / a
    length past the table row / a bad id in the shared pass of a cascade reach raise_device_errors() as a ValueError
    naming the argument; a valid call (bad ids only past the lengths) raises nothing."""
    monkeypatch.delenv("DSMATH_CHECK_BOUNDS", raising=False)
    monkeypatch.delenv("DSMATH_DECODE_BACKEND", raising=False)
    torch.manual_seed(0)
    kv = torch.randn(8, 64, 576).bfloat16().cuda()
    bt = torch.tensor([[0, 1, 2, 3], [0, 1, 4, 2**30]], dtype=torch.int32).cuda()  # row 1: 3 blocks used
    sl = torch.tensor([250, 170], dtype=torch.int32).cuda()
    q = torch.randn(2, H, 576).bfloat16().cuda()
    sp = dk.shared_prefix(bt.cpu(), sl.cpu(), 64, num_q_heads=H, device="cuda")
    assert sp is not None
    bad = bt.clone()
    bad[0, 2] = 99
    shared_bad = bt.clone()
    shared_bad[int(sp.tiles[0, 0]), 1] = -1  # a shared block: read by the cascade's shared pass only
    dk.raise_device_errors()  # start clean
    for cascade in (None, sp):
        dk.mla_decode(q, kv, bt, sl, 576**-0.5, v_head_dim=512, cascade=cascade)
        dk.raise_device_errors()  # nothing flagged
        out = dk.mla_decode(q, kv, bad, sl, 576**-0.5, v_head_dim=512, cascade=cascade)
        assert out.isfinite().all()
        with pytest.raises(ValueError, match="^block_tables"):
            dk.raise_device_errors()
        dk.mla_decode(q, kv, bt, torch.tensor([257, 170], dtype=torch.int32, device="cuda"), 576**-0.5,
                      v_head_dim=512, cascade=cascade)
        with pytest.raises(ValueError, match="^seq_lens"):
            dk.raise_device_errors()
    dk.mla_decode(q, kv, shared_bad, sl, 576**-0.5, v_head_dim=512, cascade=sp)
    with pytest.raises(ValueError, match="^block_tables"):
        dk.raise_device_errors()


def test_compile_sweep_drive_launches_every_mode(monkeypatch):
    """The plugin for issue 12's compile sweep drives the launchers with meta tensors; every launch it records is a
    kernel call with the compile-time shape the real launch would have (nothing compiles here)."""
    from dsmath_kernels import mla_decode_triton as m

    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **kw: launches.append((self.name, grid, kw))

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the real (compiled) configurations
    monkeypatch.setattr(m, "_attend_kernel", Recorder("attend"))
    monkeypatch.setattr(m, "_merge_kernel", Recorder("merge"))
    modes = []
    m.drive_compile_sweep(lambda mode, fn, *a, **kw: (modes.append(mode), fn(*a, **kw)))
    assert len(modes) == len(launches) == 2 * (2 * 3 * 3 + 1)  # dtypes x (pages x shapes x passes + merge)
    attend = [kw for name, _, kw in launches if name == "attend"]
    assert {(kw["TRANS"], kw["BLOCK_R"], kw["num_warps"]) for kw in attend} == {(True, 16, 8), (False, 64, 8),
                                                                                (True, 16, 4), (False, 64, 4)}
    assert all(kw["SHARED_V"] == (kw["D"] == 576) for kw in attend)
    assert {kw["PAGE_TILE"] for kw in attend} == {True, False}  # page 16 < 64-token tiles: per-token lookups
