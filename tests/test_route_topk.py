"""route_topk: the kernel (CPU C++ here, CUDA under the gpu marker) vs the reference and vs transformers' routers
(DeepseekV2, DeepseekV3, Qwen3-MoE); edge cases, NaN rule, gradients, bad input, torch.compile fake impl."""

import os
import shutil

import pytest
import torch

import dsmath_kernels as dk
from dsmath_kernels import _ext
from dsmath_kernels.reference import route_topk_ref, route_topk_weights_ref
from dsmath_kernels.testing import assert_close

# (T, E, K, scoring, n_group, topk_group, renormalize, scale)
CASES = [
    (1, 8, 2, "softmax", 1, 1, True, 1.0),  # Mixtral-like, one token
    (7, 64, 6, "softmax", 1, 1, False, 1.0),  # DeepSeek-V2-Lite
    (131, 160, 6, "softmax", 8, 3, False, 16.0),  # DeepSeek-V2 group-limited greedy
    (37, 256, 8, "sigmoid", 8, 4, True, 2.5),  # DeepSeek-V3
    (19, 100, 8, "sigmoid", 1, 1, True, 1.0),  # E not a power of two, no groups
    (5, 512, 16, "softmax", 32, 7, True, 1.0),  # kernel limits
    (3, 96, 1, "sigmoid", 4, 1, False, 1.0),  # top-1
    (600, 128, 8, "softmax", 1, 1, True, 1.0),  # enough rows for the threaded CPU path
]


def _run_both(T, E, K, scoring, n_group, topk_group, renorm, scale, dtype=torch.float32, device="cpu"):
    logits = torch.randn(T, E, device=device).to(dtype)
    bias = (torch.randn(E, device=device) * 0.1) if scoring == "sigmoid" else None
    kw = dict(scoring=scoring, bias=bias, n_group=n_group, topk_group=topk_group, renormalize=renorm,
              routed_scaling_factor=scale)
    return dk.route_topk(logits, K, **kw), route_topk_ref(logits, K, **kw)


def test_cpu_kernel_is_used():
    assert _ext.has_cpu_kernels(), "compiled module missing: the tests would only exercise the reference"
    from dsmath_kernels._registry import backends

    assert backends(torch.device("cpu"))["route_topk"] == "cpu"


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-E{c[1]}-K{c[2]}-{c[3]}-g{c[4]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference(case, dtype):
    (w, i), (wr, ir) = _run_both(*case, dtype=dtype)
    assert w.dtype == torch.float32 and i.dtype == torch.int32 and w.shape == (case[0], case[2])
    assert torch.equal(i, ir)
    assert_close(w, wr, atol=1e-6, rtol=1e-5, name="weights")


def test_rows_sorted_by_weight_and_ids_unique():
    (w, i), _ = _run_both(200, 256, 8, "sigmoid", 8, 4, False, 1.0)
    assert (w[:, :-1] >= w[:, 1:]).all()
    assert all(len(set(r)) == 8 for r in i.tolist())


def test_zero_tokens():
    w, i = dk.route_topk(torch.randn(0, 64), 6)
    assert w.shape == (0, 6) and i.shape == (0, 6)


def test_noncontiguous_logits():
    base = torch.randn(64, 33)
    logits = base[:, :32]  # row stride 33
    w, i = dk.route_topk(logits, 4)
    wr, ir = route_topk_ref(logits, 4)
    assert torch.equal(i, ir)
    assert_close(w, wr, atol=1e-6, rtol=1e-5)
    w2, i2 = dk.route_topk(base.t().contiguous().t()[:, :32], 4)  # column-major view
    assert torch.equal(i2, ir)


def test_ties_break_to_lower_id():
    logits = torch.zeros(3, 16)
    logits[1, 5] = logits[1, 9] = 1.0
    w, i = dk.route_topk(logits, 4)
    assert i[0].tolist() == [0, 1, 2, 3]
    assert i[1].tolist() == [5, 9, 0, 1]
    assert torch.equal(i, route_topk_ref(logits, 4)[1])


def test_nan_rule():
    """NaN ranks below every number; ids stay in range; softmax rows with a NaN are all NaN."""
    logits = torch.randn(4, 32)
    logits[0, 3] = float("nan")
    logits[2, :] = float("nan")
    for scoring in ("softmax", "sigmoid"):
        w, i = dk.route_topk(logits, 4, scoring=scoring)
        wr, ir = route_topk_ref(logits, 4, scoring=scoring)
        assert torch.equal(i, ir), scoring
        assert ((i >= 0) & (i < 32)).all()
        assert_close(w, wr, atol=1e-6, rtol=1e-5, name=f"{scoring} weights")
        assert i[2].tolist() == [0, 1, 2, 3] and w[2].isnan().all()
    w, i = dk.route_topk(logits, 4, scoring="sigmoid")
    assert 3 not in i[0].tolist() and w[0].isfinite().all()  # sigmoid: the NaN expert is simply never chosen
    w, _ = dk.route_topk(logits, 4, scoring="softmax")
    assert w[0].isnan().all() and w[1].isfinite().all()


@pytest.mark.parametrize("scoring,n_group,topk_group,renorm,scale", [
    ("softmax", 1, 1, True, 1.0), ("softmax", 4, 2, False, 2.0), ("sigmoid", 4, 2, True, 2.5),
    ("sigmoid", 1, 1, False, 1.0)])
def test_gradient_matches_fp64_reference(scoring, n_group, topk_group, renorm, scale):
    logits = torch.randn(9, 32, dtype=torch.float32)
    bias = torch.randn(32) * 0.1 if scoring == "sigmoid" else None
    kw = dict(scoring=scoring, bias=bias, n_group=n_group, topk_group=topk_group, renormalize=renorm,
              routed_scaling_factor=scale)
    x = logits.clone().requires_grad_()
    w, ids = dk.route_topk(x, 5, **kw)
    g = torch.randn_like(w)
    (w * g).sum().backward()
    # fp64 reference with the same ids: autograd of the reference formula
    x64 = logits.double().requires_grad_()
    s = torch.softmax(x64, -1) if scoring == "softmax" else torch.sigmoid(x64)
    wr = s.gather(1, ids.long())
    if renorm:
        wr = wr / (wr.sum(-1, keepdim=True) + 1e-20)
    (wr * scale * g.double()).sum().backward()
    assert_close(x.grad, x64.grad, atol=1e-6, rtol=1e-4, name="d logits")


def test_gradient_bf16_logits_dtype():
    x = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    w, _ = dk.route_topk(x, 2)
    w.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad.shape == x.shape


@pytest.mark.parametrize("bad,exc,match", [
    (dict(top_k=9), ValueError, "top_k"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(n_group=3), ValueError, "n_group"),
    (dict(n_group=4, topk_group=1, top_k=3), ValueError, "top_k"),
    (dict(topk_group=2), ValueError, "topk_group"),
    (dict(scoring="relu"), ValueError, "scoring"),
    (dict(bias=torch.zeros(7), scoring="sigmoid"), ValueError, "bias"),
    (dict(bias=torch.zeros(8)), ValueError, "bias"),
    (dict(logits=torch.zeros(4, 8, dtype=torch.int32)), TypeError, "logits"),
    (dict(logits=torch.zeros(2, 4, 8)), ValueError, "logits"),
    (dict(logits=[[0.0] * 8]), TypeError, "logits"),
])
def test_bad_input_names_the_argument(bad, exc, match):
    args = dict(logits=torch.randn(4, 8), top_k=2)
    args.update(bad)
    logits, top_k = args.pop("logits"), args.pop("top_k")
    with pytest.raises(exc, match=match):
        dk.route_topk(logits, top_k, **args)


def test_bias_on_another_device_rejected():
    with pytest.raises(ValueError, match="bias.*device"):
        dk.route_topk(torch.randn(4, 8), 2, scoring="sigmoid", bias=torch.zeros(8, device="meta"))


def test_sigmoid_groups_of_one_rejected():
    with pytest.raises(ValueError, match="n_group"):
        dk.route_topk(torch.randn(2, 8), 2, scoring="sigmoid", n_group=8, topk_group=4)


def test_beyond_kernel_limits_falls_back_to_reference():
    logits = torch.randn(5, 600)
    w, i = dk.route_topk(logits, 20)
    wr, ir = route_topk_ref(logits, 20)
    assert torch.equal(i, ir)
    assert_close(w, wr)


def test_opcheck_and_compile():
    logits = torch.randn(6, 32, requires_grad=True)
    torch.library.opcheck(torch.ops.dsmath.route_topk.default, (logits, 4, "softmax", None, 4, 2, True, 1.0))

    @torch.compile(backend="eager", fullgraph=True)
    def f(x):
        w, i = dk.route_topk(x, 4)
        return w * 2, i

    w, i = f(logits)
    wr, ir = route_topk_ref(logits, 4)
    assert torch.equal(i, ir)
    assert_close(w, wr * 2)


# ---- transformers' routers: ids must be identical (as sets per row: HF leaves them unsorted), weights to fp32


def _sorted_by_id(w, i):
    order = i.long().argsort(dim=-1)
    return w.gather(1, order), i.long().gather(1, order)


def _check_against_hf(router_out, ours):
    _, hw, hi = router_out
    w, i = _sorted_by_id(*ours)
    hw, hi = _sorted_by_id(hw.float(), hi)
    assert torch.equal(i, hi)
    assert_close(w, hw, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method,n_group,topk_group", [("greedy", 1, 1), ("group_limited_greedy", 8, 3)])
def test_matches_transformers_deepseek_v2(method, n_group, topk_group):
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    cfg = DeepseekV2Config(hidden_size=32, n_routed_experts=64, num_experts_per_tok=6, topk_method=method,
                           n_group=n_group, topk_group=topk_group, routed_scaling_factor=1.5)
    router = DeepseekV2TopkRouter(cfg)
    torch.nn.init.normal_(router.weight)
    h = torch.randn(50, 32)
    out = router(h)
    ours = dk.route_topk(out[0], 6, scoring="softmax", n_group=n_group, topk_group=topk_group, renormalize=False,
                         routed_scaling_factor=1.5)
    _check_against_hf(out, ours)


def test_matches_transformers_deepseek_v3():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = DeepseekV3Config(hidden_size=32, n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4,
                           norm_topk_prob=True, routed_scaling_factor=2.5)
    router = DeepseekV3TopkRouter(cfg)
    torch.nn.init.normal_(router.weight)
    router.e_score_correction_bias.normal_(0, 0.1)
    h = torch.randn(50, 32)
    out = router(h)
    ours = dk.route_topk(out[0], 8, scoring="sigmoid", bias=router.e_score_correction_bias, n_group=8,
                         topk_group=4, renormalize=True, routed_scaling_factor=2.5)
    _check_against_hf(out, ours)


@pytest.mark.parametrize("norm", [True, False])
def test_matches_transformers_qwen3_moe(norm):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    cfg = Qwen3MoeConfig(hidden_size=32, num_experts=128, num_experts_per_tok=8, norm_topk_prob=norm)
    router = Qwen3MoeTopKRouter(cfg)
    torch.nn.init.normal_(router.weight)
    out = router(torch.randn(50, 32))
    _check_against_hf(out, dk.route_topk(out[0], 8, renormalize=norm))


# ---- routing replay: route_topk_weights (weights of given ids)


def _replay_kw(case):
    _, _, _, scoring, _, _, renorm, scale = case
    return dict(scoring=scoring, renormalize=renorm, routed_scaling_factor=scale)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-E{c[1]}-K{c[2]}-{c[3]}-g{c[4]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replay_weights_are_route_topks_bit_for_bit(case, dtype):
    """The ids route_topk chose, handed back in any order and any int dtype: exactly its weights (same backend)."""
    T, E, K = case[:3]
    logits = torch.randn(T, E).to(dtype)
    bias = torch.randn(E) * 0.1 if case[3] == "sigmoid" else None
    w, ids = dk.route_topk(logits, K, bias=bias, n_group=case[4], topk_group=case[5], **_replay_kw(case))
    perm = torch.randperm(K)
    for id_dtype in (torch.int16, torch.int32, torch.int64):
        wr = dk.route_topk_weights(logits, ids[:, perm].to(id_dtype), **_replay_kw(case))
        assert wr.dtype == torch.float32 and wr.shape == (T, K)
        assert torch.equal(wr, w[:, perm]), id_dtype


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-E{c[1]}-K{c[2]}-{c[3]}-g{c[4]}")
def test_replay_weights_of_arbitrary_ids_match_reference(case):
    T, E, K = case[:3]
    logits = torch.randn(T, E, dtype=torch.float16)
    ids = torch.rand(T, E).argsort(dim=1)[:, :K]  # any K distinct experts, not the top-k
    w = dk.route_topk_weights(logits, ids, **_replay_kw(case))
    assert_close(w, route_topk_weights_ref(logits, ids, **_replay_kw(case)), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("scoring,renorm,scale", [("softmax", True, 1.0), ("softmax", False, 2.0),
                                                  ("sigmoid", True, 2.5), ("sigmoid", False, 1.0)])
def test_replay_gradient_matches_fp64_reference(scoring, renorm, scale):
    logits = torch.randn(9, 32)
    ids = torch.rand(9, 32).argsort(dim=1)[:, :5]
    kw = dict(scoring=scoring, renormalize=renorm, routed_scaling_factor=scale)
    x = logits.clone().requires_grad_()
    w = dk.route_topk_weights(x, ids, **kw)
    g = torch.randn_like(w)
    (w * g).sum().backward()
    x64 = logits.double().requires_grad_()
    (route_topk_weights_ref(x64, ids, **kw).double() * g.double()).sum().backward()
    assert x.grad.abs().sum() > 0
    assert_close(x.grad, x64.grad, atol=1e-6, rtol=1e-4, name="d logits")


def test_replay_gradient_equals_route_topks_for_its_own_ids():
    x1 = torch.randn(12, 64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    w1, ids = dk.route_topk(x1, 6, renormalize=True, routed_scaling_factor=1.5)
    w2 = dk.route_topk_weights(x2, ids, renormalize=True, routed_scaling_factor=1.5)
    g = torch.randn_like(w1)
    (w1 * g).sum().backward()
    (w2 * g).sum().backward()
    assert torch.equal(x1.grad, x2.grad)


def test_replay_edge_cases():
    assert dk.route_topk_weights(torch.randn(0, 16), torch.zeros(0, 3, dtype=torch.int32)).shape == (0, 3)
    base = torch.randn(20, 41)
    logits = base[:, :40]  # row stride 41
    ids = torch.rand(20, 40).argsort(dim=1)[:, :4]
    assert_close(dk.route_topk_weights(logits, ids), route_topk_weights_ref(logits, ids), atol=1e-6, rtol=1e-5)
    big = torch.randn(3, 600)  # beyond the kernel's 512 experts: the reference
    ids = torch.rand(3, 600).argsort(dim=1)[:, :20]
    assert_close(dk.route_topk_weights(big, ids), route_topk_weights_ref(big, ids))
    nan = torch.randn(2, 8)
    nan[0, 1] = float("nan")
    w = dk.route_topk_weights(nan, torch.tensor([[0, 2], [0, 2]]), scoring="softmax")
    assert w[0].isnan().all() and w[1].isfinite().all()  # a softmax row with a NaN logit, as route_topk


@pytest.mark.parametrize("bad,exc,match", [
    (dict(ids=torch.tensor([[0, 8]] * 4)), ValueError, "ids.*\\[0, 8\\)"),
    (dict(ids=torch.tensor([[-1, 2]] * 4)), ValueError, "ids"),
    (dict(ids=torch.zeros(3, 2, dtype=torch.int64)), ValueError, "ids"),
    (dict(ids=torch.zeros(4, 9, dtype=torch.int64)), ValueError, "ids"),
    (dict(ids=torch.zeros(4, 2)), TypeError, "ids"),
    (dict(ids=torch.zeros(4, 2, dtype=torch.int64, device="meta")), ValueError, "ids.*device"),
    (dict(scoring="relu"), ValueError, "scoring"),
    (dict(logits=torch.zeros(4, 8, dtype=torch.int32)), TypeError, "logits"),
])
def test_replay_bad_input_names_the_argument(bad, exc, match):
    args = dict(logits=torch.randn(4, 8), ids=torch.tensor([[0, 1]] * 4))
    args.update(bad)
    with pytest.raises(exc, match=match):
        dk.route_topk_weights(args.pop("logits"), args.pop("ids"), **args)


def test_replay_opcheck_and_compile():
    logits = torch.randn(6, 32, requires_grad=True)
    ids = torch.rand(6, 32).argsort(dim=1)[:, :4].int()
    torch.library.opcheck(torch.ops.dsmath.route_topk_weights.default, (logits, ids, "sigmoid", True, 2.0))

    @torch.compile(backend="eager", fullgraph=True)
    def f(x, i):
        return dk.route_topk_weights(x, i) * 2

    assert_close(f(logits, ids), route_topk_weights_ref(logits, ids) * 2)


# ---- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES + [(65536, 256, 8, "sigmoid", 8, 4, True, 2.5), (4096, 64, 6, "softmax",
                                                                                          1, 1, False, 1.0)],
                         ids=lambda c: f"T{c[0]}-E{c[1]}-K{c[2]}-{c[3]}-g{c[4]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(case, dtype, launches):
    assert _ext.has_cuda_kernels(torch.device("cuda")), "CUDA kernels not compiled for this GPU"
    (w, i), (wr, ir) = _run_both(*case, dtype=dtype, device="cuda")
    launches.assert_ran("route_topk", "cuda")
    assert torch.equal(i, ir)
    assert_close(w, wr, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES + [(65536, 256, 8, "sigmoid", 8, 4, True, 2.5)],
                         ids=lambda c: f"T{c[0]}-E{c[1]}-K{c[2]}-{c[3]}-g{c[4]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_replay_weights(case, dtype):
    """CUDA route_topk_weights: bit-identical to CUDA route_topk for its own ids (any order), the reference for
    arbitrary ids, gradients as the reference's, and CUDA-graph capturable."""
    T, E, K = case[:3]
    logits = torch.randn(T, E, device="cuda").to(dtype)
    bias = torch.randn(E, device="cuda") * 0.1 if case[3] == "sigmoid" else None
    w, ids = dk.route_topk(logits, K, bias=bias, n_group=case[4], topk_group=case[5], **_replay_kw(case))
    perm = torch.randperm(K, device="cuda")
    assert torch.equal(dk.route_topk_weights(logits, ids[:, perm].short(), **_replay_kw(case)), w[:, perm])
    other = torch.rand(T, E, device="cuda").argsort(dim=1)[:, :K]
    x = logits.float().requires_grad_()
    wr = dk.route_topk_weights(x, other, **_replay_kw(case))
    assert_close(wr, route_topk_weights_ref(logits, other, **_replay_kw(case)), atol=1e-6, rtol=1e-5)
    if T <= 1024:
        g = torch.randn_like(wr)
        (wr * g).sum().backward()
        x64 = logits.double().requires_grad_()
        (route_topk_weights_ref(x64, other, **_replay_kw(case)).double() * g.double()).sum().backward()
        assert_close(x.grad, x64.grad, atol=1e-6, rtol=1e-4)
    static = logits[:64].clone()
    sid = ids[:64].clone()
    dk.route_topk_weights(static, sid, **_replay_kw(case))  # warm up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        wg = dk.route_topk_weights(static, sid, **_replay_kw(case))
    static.copy_(torch.randn_like(static))
    graph.replay()
    assert_close(wg, route_topk_weights_ref(static, sid, **_replay_kw(case)), atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
def test_cuda_nan_and_zero_tokens_and_graph():
    logits = torch.randn(64, 256, device="cuda")
    logits[3, 7] = float("nan")
    w, i = dk.route_topk(logits, 8, scoring="sigmoid", n_group=8, topk_group=4)
    wr, ir = route_topk_ref(logits, 8, scoring="sigmoid", n_group=8, topk_group=4)
    assert torch.equal(i, ir)
    assert dk.route_topk(logits[:0], 8)[0].shape == (0, 8)
    static = torch.randn(16, 64, device="cuda")
    dk.route_topk(static, 6)  # warm up
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        wg, ig = dk.route_topk(static, 6)
    static.copy_(torch.randn(16, 64, device="cuda"))
    g.replay()
    assert torch.equal(ig, route_topk_ref(static, 6)[1])


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CI build has it)")
def test_cuda_kernels_use_no_local_memory():
    # route_topk.cu at sm_90a: no stack frame (per-thread arrays) and no spills in either kernel — lane k holds pick
    # k, the sort is a warp rank; ptxas's own figures (the compile report's CUDA section).
    from dsmath_kernels.compile_report import cuda_section

    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")  # CI: installed package
    rows = cuda_section("sm_90", files=["route_topk.cu"], csrc=csrc)
    assert {r.get("kernel") for r in rows} == {"route_topk_kernel", "route_weights_kernel"}, rows
    for r in rows:
        assert r["stack"] == 0 and r["spill"] == 0 and r["problems"] == [], r
