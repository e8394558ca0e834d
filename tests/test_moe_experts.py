"""moe_experts: vs the reference and vs transformers' DeepseekV3Experts given the same weights (odd shapes, empty
experts, one hot expert, T = 0 / 1), inference (fused) and training paths, gradients of x, weights, w_gate_up and
w_down vs autograd through the fp64 reference, boundary checks."""

import pytest
import torch

from dsmath_kernels import moe_experts
from dsmath_kernels.reference.moe import moe_experts_ref
from dsmath_kernels.testing import assert_close

TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (5e-2, 5e-2)}


def _layer(T, H, Im, E, K, dtype, kind="uniform", device="cpu"):
    x = torch.randn(T, H, dtype=dtype, device=device)
    w_gate_up = (torch.randn(E, 2 * Im, H, device=device) / H**0.5).to(dtype)
    w_down = (torch.randn(E, H, Im, device=device) / Im**0.5).to(dtype)
    weights = torch.rand(T, K, device=device)
    if kind == "hot":
        ids = torch.zeros(T, K, dtype=torch.int32, device=device)
        ids[:, 0] = 1  # expert 1 gets every token, 0 gets the rest of the slots, the others none
    elif T:
        ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).int().to(device)
    else:
        ids = torch.zeros(0, K, dtype=torch.int32, device=device)
    return x, w_gate_up, w_down, weights, ids


SHAPES = [(0, 16, 8, 4, 2), (1, 40, 24, 6, 3), (7, 96, 40, 5, 2), (33, 40, 20, 16, 4)]


@pytest.mark.parametrize("T,H,Im,E,K", SHAPES)
@pytest.mark.parametrize("kind", ["uniform", "hot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad", [False, True])
def test_matches_reference(T, H, Im, E, K, kind, dtype, grad):
    x, wgu, wd, w, ids = _layer(T, H, Im, E, K, dtype, kind)
    want = moe_experts_ref(x, wgu, wd, w, ids)
    with torch.set_grad_enabled(grad):
        got = moe_experts(x.requires_grad_(grad), wgu, wd, w, ids)
    assert got.dtype == dtype and got.shape == (T, H)
    atol, rtol = TOL[dtype]
    assert_close(got, want, atol=atol, rtol=rtol, name="out")


@pytest.mark.parametrize("T,H,Im,E,K", [(9, 32, 16, 8, 3), (1, 24, 8, 4, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_transformers_deepseek_v3(T, H, Im, E, K, dtype):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

    cfg = DeepseekV3Config(hidden_size=H, moe_intermediate_size=Im, n_routed_experts=E, num_experts_per_tok=K,
                           hidden_act="silu")
    cfg.num_local_experts = E
    hf = DeepseekV3Experts(cfg).to(dtype)
    x, wgu, wd, w, ids = _layer(T, H, Im, E, K, dtype)
    with torch.no_grad():
        hf.gate_up_proj.copy_(wgu)
        hf.down_proj.copy_(wd)
        want = hf(x, ids.long(), w.to(dtype))
    got = moe_experts(x, wgu, wd, w, ids)
    atol, rtol = TOL[dtype]
    if dtype == torch.bfloat16:  # HF rounds every intermediate to bf16: compare both against the fp32 spec
        spec = moe_experts_ref(x.float(), wgu.float(), wd.float(), w, ids)
        assert_close(want, spec, atol=atol, rtol=rtol, name="transformers")
    assert_close(got, want, atol=atol, rtol=rtol, name="out vs DeepseekV3Experts")


@pytest.mark.parametrize("T,H,Im,E,K,kind", [(6, 12, 8, 4, 2, "uniform"), (5, 8, 6, 3, 3, "hot"),
                                            (1, 8, 4, 5, 2, "uniform")])
def test_gradients_vs_fp64_reference(T, H, Im, E, K, kind):
    x, wgu, wd, w, ids = _layer(T, H, Im, E, K, torch.float64, kind)
    w = w.float()
    ins = [t.clone().requires_grad_(True) for t in (x, wgu, wd, w)]
    ref_ins = [t.detach().double().requires_grad_(True) for t in (x, wgu, wd, w)]
    out = moe_experts(*ins[:4], ids)
    ref = moe_experts_ref(*ref_ins[:3], ref_ins[3], ids)
    dout = torch.randn_like(ref)
    got = torch.autograd.grad(out, ins, dout)
    want = torch.autograd.grad(ref, ref_ins, dout)
    for name, a, b in zip(("x", "w_gate_up", "w_down", "weights"), got, want):
        tol = 1e-5 if name == "weights" else 1e-9  # weights are float32 by contract
        assert a.dtype == ins[["x", "w_gate_up", "w_down", "weights"].index(name)].dtype
        assert_close(a, b, atol=tol, rtol=tol, name=f"d{name}")


def test_gradcheck_x_and_weights():
    x, wgu, wd, w, ids = _layer(4, 6, 4, 3, 2, torch.float64)
    x.requires_grad_(True)
    wgu.requires_grad_(True)
    wd.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, c: moe_experts(a, b, c, w, ids), (x, wgu, wd))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_low_precision(dtype):
    x, wgu, wd, w, ids = _layer(17, 32, 16, 6, 3, dtype)
    ins = [t.clone().requires_grad_(True) for t in (x, wgu, wd, w)]
    ref_ins = [t.detach().double().requires_grad_(True) for t in (x, wgu, wd, w)]
    out = moe_experts(*ins, ids)
    ref = moe_experts_ref(*ref_ins, ids)
    dout = torch.randn_like(ref)
    got = torch.autograd.grad(out, ins, dout.to(dtype))
    want = torch.autograd.grad(ref, ref_ins, dout)
    for name, a, b in zip(("x", "w_gate_up", "w_down", "weights"), got, want):
        scale = b.abs().max().item() + 1e-6
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        assert_close(a, b, atol=tol * scale, rtol=tol, name=f"d{name}", max_global_rel=tol)


def test_rejects_bad_inputs():
    x, wgu, wd, w, ids = _layer(5, 16, 8, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="ids"):
        bad = ids.clone()
        bad[2, 1] = 4
        moe_experts(x, wgu, wd, w, bad)
    with pytest.raises(ValueError, match="ids"):
        bad = ids.clone()
        bad[0, 0] = -1
        moe_experts(x, wgu, wd, w, bad)
    with pytest.raises(TypeError, match="weights"):
        moe_experts(x, wgu, wd, w.double(), ids)
    with pytest.raises(TypeError, match="w_gate_up"):
        moe_experts(x, wgu.half(), wd, w, ids)
    with pytest.raises(ValueError, match="w_gate_up"):
        moe_experts(x, wgu[:, :-1], wd, w, ids)
    with pytest.raises(ValueError, match="w_down"):
        moe_experts(x, wgu, wd[:, :, :-1], w, ids)
    with pytest.raises(ValueError, match="weights"):
        moe_experts(x, wgu, wd, w[:, :1], ids)
    with pytest.raises(ValueError, match="ids"):
        moe_experts(x, wgu, wd, w, ids[:4])
    with pytest.raises(TypeError, match="ids"):
        moe_experts(x, wgu, wd, w, ids.float())


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, wgu, wd = torch.empty(5, 16), torch.empty(4, 16, 16), torch.empty(4, 16, 8)
        w, ids = torch.empty(5, 2), torch.empty(5, 2, dtype=torch.int32)
        assert tuple(torch.ops.dsmath.moe_experts(x, wgu, wd, w, ids).shape) == (5, 16)
        h, a, order, offsets, inverse = outs = torch.ops.dsmath.moe_experts_gate_up(x, wgu, ids)
        assert [tuple(o.shape) for o in outs] == [(10, 16), (10, 8), (10,), (5,), (5, 2)]
        outs = torch.ops.dsmath.moe_experts_down(h, a, wd, w, order, offsets, inverse)
        assert [tuple(o.shape) for o in outs] == [(5, 16), (10, 16)]


# ---------------------------------------------------------------- Triton path (interpreter without a GPU)

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_fused_inference_matches_reference(dtype, monkeypatch):
    monkeypatch.setenv("DSMATH_GROUPED_GEMM", "triton")
    x, wgu, wd, w, ids = _layer(9, 40, 24, 5, 3, dtype)
    ids[0] = torch.tensor([4, 3, 2], dtype=torch.int32)  # expert 4: one row; expert 1 may be empty
    with torch.no_grad():
        got = moe_experts(x, wgu, wd, w, ids)
    atol, rtol = TOL[dtype]
    assert_close(got, moe_experts_ref(x, wgu, wd, w, ids), atol=atol, rtol=rtol, name="out")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_training_gradients(dtype, monkeypatch):
    monkeypatch.setenv("DSMATH_GROUPED_GEMM", "triton")
    x, wgu, wd, w, ids = _layer(7, 24, 16, 4, 2, dtype, "hot")
    ins = [t.clone().requires_grad_(True) for t in (x, wgu, wd, w)]
    ref_ins = [t.detach().double().requires_grad_(True) for t in (x, wgu, wd, w)]
    out = moe_experts(*ins, ids)
    ref = moe_experts_ref(*ref_ins, ids)
    dout = torch.randn_like(ref)
    got = torch.autograd.grad(out, ins, dout.to(dtype))
    want = torch.autograd.grad(ref, ref_ins, dout)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert_close(out, ref, atol=tol, rtol=tol, name="out")
    for name, a, b in zip(("x", "w_gate_up", "w_down", "weights"), got, want):
        scale = b.abs().max().item() + 1e-6
        assert_close(a, b, atol=tol * scale, rtol=tol, name=f"d{name}", max_global_rel=tol)


# ---------------------------------------------------------------- GPU (bf16, real shapes)

@pytest.mark.gpu
@pytest.mark.parametrize("T,H,Im,E,K", [(1, 2048, 1408, 64, 6), (256, 2048, 1408, 64, 6), (2048, 7168, 2048, 32, 8)])
def test_gpu_bf16_forward_and_backward(T, H, Im, E, K, launches):
    x, wgu, wd, w, ids = _layer(T, H, Im, E, K, torch.bfloat16, device="cuda")
    ref_in = [t.float() for t in (x, wgu, wd)]
    with torch.no_grad():
        got = moe_experts(x, wgu, wd, w, ids)
        want = moe_experts_ref(*ref_in, w, ids)
    launches.assert_ran("moe_experts", "permute cuda, gemm triton")
    assert_close(got, want, atol=5e-2, rtol=5e-2, name="out", max_global_rel=2e-2)
    ins = [t.clone().requires_grad_(True) for t in (x, wgu, wd, w)]
    out = moe_experts(*ins, ids)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, ins, dout)
    r_ins = [t.detach().float().requires_grad_(True) for t in (x, wgu, wd, w)]
    want = torch.autograd.grad(moe_experts_ref(*r_ins, ids), r_ins, dout.float())
    for name, a, b in zip(("x", "w_gate_up", "w_down", "weights"), got, want):
        assert_close(a, b, atol=5e-2 * (b.abs().max().item() + 1e-6), rtol=5e-2, name=f"d{name}",
                     max_global_rel=2e-2)


@pytest.mark.gpu
def test_gpu_cuda_graph_decode():
    """Decode step captured in a CUDA graph: permutation + fused GEMMs, replayed with new routing."""
    x, wgu, wd, w, ids = _layer(8, 2048, 1408, 64, 6, torch.bfloat16, device="cuda")
    with torch.no_grad():
        moe_experts(x, wgu, wd, w, ids)  # compile / autotune outside capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = moe_experts(x, wgu, wd, w, ids)
        ids.copy_(torch.stack([torch.randperm(64)[:6] for _ in range(8)]).int().cuda())
        x.copy_(torch.randn_like(x))
        g.replay()
        want = moe_experts_ref(x.float(), wgu.float(), wd.float(), w, ids)
    assert_close(out, want, atol=5e-2, rtol=5e-2, name="graph out", max_global_rel=2e-2)


@pytest.mark.slow
def test_torch_compile_fullgraph_forward_and_backward():
    """The ops trace under torch.compile (fake impls; value checks skipped while compiling); ~1 min of compile."""
    x, wgu, wd, w, ids = _layer(9, 16, 8, 4, 2, torch.float32)
    f = torch.compile(moe_experts, fullgraph=True)
    with torch.no_grad():
        assert_close(f(x, wgu, wd, w, ids), moe_experts_ref(x, wgu, wd, w, ids), atol=1e-5, rtol=1e-5, name="out")
    xg, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    f(xg, wgu, wd, w, ids).sum().backward()
    moe_experts_ref(xr, wgu, wd, w, ids).sum().backward()
    assert_close(xg.grad, xr.grad, atol=1e-4, rtol=1e-4, name="dx")


# ---------------------------------------------------------------- training as two autograd nodes

def test_training_ops_opcheck():
    """The two training ops (gate-up node, down node): schema, fake impls, autograd registration, AOT dispatch."""
    x, wgu, wd, w, ids = _layer(7, 16, 8, 4, 2, torch.float32, "hot")
    x, wgu, wd, w = (t.requires_grad_(True) for t in (x, wgu, wd, w))
    torch.library.opcheck(torch.ops.dsmath.moe_experts_gate_up.default, (x, wgu, ids))
    h, a, order, offsets, inverse = (t.detach() for t in torch.ops.dsmath.moe_experts_gate_up(x, wgu, ids))
    torch.library.opcheck(torch.ops.dsmath.moe_experts_down.default,
                          (h.requires_grad_(True), a.requires_grad_(True), wd, w, order, offsets, inverse))


def test_down_weight_gradient_is_accumulated_before_gate_up_backward():
    """Peak memory: d w_down reaches w_down.grad (and is freed) before the gate-up node's backward allocates
    d w_gate_up — two autograd nodes, as transformers' two grouped GEMMs (one node held both: +403 MB at
    Qwen3-30B-A3B's layer, bench/RESULTS.md)."""
    x, wgu, wd, w, ids = _layer(9, 16, 8, 4, 2, torch.float32)
    x, wgu, wd, w = (t.requires_grad_(True) for t in (x, wgu, wd, w))
    events = []
    wd.register_post_accumulate_grad_hook(lambda p: events.append("w_down.grad"))
    wgu.register_post_accumulate_grad_hook(lambda p: events.append("w_gate_up.grad"))
    out = moe_experts(x, wgu, wd, w, ids)
    gate_up_node = out.grad_fn.next_functions[0][0]  # h's node
    gate_up_node.register_prehook(lambda grads: events.append("gate-up backward"))
    out.sum().backward()
    assert events == ["w_down.grad", "gate-up backward", "w_gate_up.grad"], events
    ref_ins = [t.detach().double().requires_grad_(True) for t in (x, wgu, wd, w)]
    moe_experts_ref(*ref_ins, ids).sum().backward()
    for name, a, b in zip(("x", "w_gate_up", "w_down", "weights"), (x, wgu, wd, w), ref_ins):
        assert_close(a.grad, b.grad.float(), atol=1e-4, rtol=1e-4, name=name)


def test_frozen_expert_weights():
    """Only x and weights train (frozen experts): the weight gradients are neither returned nor computed."""
    x, wgu, wd, w, ids = _layer(6, 12, 8, 4, 2, torch.float32)
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    xr, wr = x.double().requires_grad_(True), w.double().requires_grad_(True)
    moe_experts(xg, wgu, wd, wg, ids).sum().backward()
    moe_experts_ref(xr, wgu.double(), wd.double(), wr, ids).sum().backward()
    assert wgu.grad is None and wd.grad is None
    assert_close(xg.grad, xr.grad.float(), atol=1e-4, rtol=1e-4, name="dx")
    assert_close(wg.grad, wr.grad.float(), atol=1e-4, rtol=1e-4, name="dweights")
