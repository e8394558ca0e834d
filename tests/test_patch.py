"""dsmath_kernels.patch on tiny random transformers models of each supported class, built from configs here (no
download): logits, loss and every parameter gradient of the patched model equal the unpatched model's within
fp32 1e-4 relative, in eval and train mode, for every gating mode the configs select; the report lists the
patched modules; patching twice is harmless; unpatch restores; an unsupported model gets a clear message and is
left unchanged; patch_class patches before loading; other transformers MoE families are probed."""

import copy
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_models import randomize  # noqa: E402

import dsmath_kernels  # noqa: E402
from dsmath_kernels.hf import UnsupportedModelError  # noqa: E402
from model.presets import preset_dict  # noqa: E402

REL = 1e-4
pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {  # every gating mode the three families' configs select
    "v2-group-limited": ("tiny-v2", {}),
    "v2-greedy-scaled": ("tiny-v2", {"topk_method": "greedy", "n_group": 1, "topk_group": 1,
                                     "routed_scaling_factor": 1.5}),
    "v3-grouped": ("tiny-v3", {}),
    "v3-ungrouped-unnormalized": ("tiny-v3", {"n_group": 1, "topk_group": 1, "norm_topk_prob": False}),
    "qwen3": ("tiny-qwen3", {}),
    "qwen3-unnormalized": ("tiny-qwen3", {"norm_topk_prob": False}),
}


def hf_model(preset: str, **overrides) -> torch.nn.Module:
    """A tiny random transformers model (fp32, eval mode) from one of our presets' config.json dicts."""
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(**preset_dict(preset, **{"num_hidden_layers": 2, **overrides}))
    m = transformers.AutoModelForCausalLM.from_config(cfg)
    randomize(m)
    return m.eval()


def other_model(model_type: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, eos_token_id=1, bos_token_id=0, pad_token_id=0)
    m = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **base, **kw))
    randomize(m)
    return m.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_same_grads(patched, ref) -> None:
    pairs = list(zip(patched.named_parameters(), ref.named_parameters()))
    assert any("mlp.gate.weight" in n for (n, _), _ in pairs if _[1].grad is not None), "router got no gradient"
    for (name, p), (_, r) in pairs:
        assert (p.grad is None) == (r.grad is None), name
        if r.grad is not None:
            assert rel_err(p.grad, r.grad) <= REL, f"{name}: gradient relative error {rel_err(p.grad, r.grad):.3g}"


def patched_pair(model):
    p = copy.deepcopy(model)
    report = dsmath_kernels.patch(p)
    return p, report


def tokens(B=2, T=11, seed=1):
    return torch.randint(2, 128, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_logits_loss_and_grads_match_unpatched(case, mode):
    preset, overrides = CASES[case]
    ref = hf_model(preset, **overrides)
    pat, report = patched_pair(ref)
    assert len(report.paths("router")) == len(report.paths("experts")) >= 1
    ids = tokens()
    labels = ids.clone()
    labels[0, :3] = -100  # prompt tokens ignored
    getattr(ref, mode)()
    getattr(pat, mode)()
    with torch.no_grad():
        assert rel_err(pat(ids).logits, ref(ids).logits) <= REL
    out_p, out_r = pat(ids, labels=labels), ref(ids, labels=labels)
    assert (out_p.logits is None) == (mode == "train")  # fused loss in training: no [B, T, V] logits
    assert rel_err(out_p.loss, out_r.loss) <= REL
    out_p.loss.backward()
    out_r.loss.backward()
    assert_same_grads(pat, ref)


def test_bf16_router_ties_do_not_block_patching():
    """Experts that tie on the router logit (bf16 logits tie often) may be picked differently by torch.topk and
    route_topk: the probe accepts that, and every router is patched."""
    m = hf_model("tiny-qwen3", num_experts=64, num_experts_per_tok=8).to(torch.bfloat16)
    with torch.no_grad():
        w = m.model.layers[0].mlp.gate.weight  # [64, H]
        w.copy_(w[::4].repeat_interleave(4, 0))  # experts 4i .. 4i+3 always tie: ties at the top-8 boundary
    report = dsmath_kernels.patch(m)
    assert report.paths("router") == ["model.layers.0.mlp.gate"], report.left


def test_report_lists_patched_and_left_modules():
    m = hf_model("tiny-v3")
    report = dsmath_kernels.patch(m)
    moe_layers = [i for i, layer in enumerate(m.model.layers) if hasattr(layer.mlp, "experts")]
    assert moe_layers == [1]  # first_k_dense_replace = 1
    assert report.paths("router") == ["model.layers.1.mlp.gate"]
    assert report.paths("experts") == ["model.layers.1.mlp.experts"]
    assert report.paths("loss") == [""]
    kernels = {w: k for _, w, k in report.patched}
    assert "route_topk(sigmoid" in kernels["router"] and "n_group=4" in kernels["router"]
    assert "e_score_correction_bias" in kernels["router"] and "scale=2.5" in kernels["router"]
    norms = [p for p, w, _ in report.left if w == "rms_norm"]
    assert "model.norm" in norms and "model.layers.0.input_layernorm" in norms
    assert all("no fused RMSNorm kernel" in r for _, w, r in report.left if w == "rms_norm")
    text = str(report)
    assert "model.layers.1.mlp.gate" in text and "route_topk" in text and "moe_experts" in text
    assert type(m.model.layers[1].mlp.gate.__dict__["forward"]).__name__ == "method"


def test_patch_twice_is_harmless_and_unpatch_restores():
    ref = hf_model("tiny-qwen3")
    m = copy.deepcopy(ref)
    first = dsmath_kernels.patch(m)
    second = dsmath_kernels.patch(m)
    assert second.paths() == first.paths()
    assert all("already patched" in k for _, _, k in second.patched)
    ids = tokens()
    with torch.no_grad():
        assert rel_err(m(ids).logits, ref(ids).logits) <= REL
    restored = dsmath_kernels.unpatch(m)
    assert sorted(restored) == sorted(first.paths())
    assert not any("forward" in mod.__dict__ or any(k.startswith("_dsmath") for k in mod.__dict__)
                   for mod in m.modules())
    with torch.no_grad():
        assert torch.equal(m(ids).logits, ref(ids).logits)  # transformers' own forwards again, bit for bit
    assert dsmath_kernels.unpatch(m) == []


def test_unpatch_keeps_a_forward_bound_before_patching():
    m = hf_model("tiny-qwen3")
    gate = m.model.layers[0].mlp.gate
    calls = []

    def traced(hidden_states, _orig=gate.forward):
        calls.append(1)
        return _orig(hidden_states)

    gate.forward = traced
    dsmath_kernels.patch(m)
    dsmath_kernels.unpatch(m)
    assert gate.forward is traced


@pytest.mark.parametrize("model_type,kw,expect", [
    ("llama", {}, "no module holds MoE experts"),
    ("gpt_oss", {"num_local_experts": 8, "num_experts_per_tok": 2, "head_dim": 16}, "transposed expert layout"),
])
def test_unsupported_model_gets_a_clear_message_and_is_left_intact(model_type, kw, expect):
    m = other_model(model_type, **kw)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ids = tokens()
    with torch.no_grad():
        logits = m(ids).logits
    with pytest.raises(UnsupportedModelError, match=expect) as e:
        dsmath_kernels.patch(m)
    msg = str(e.value)
    assert type(m).__name__ in msg and "not changed" in msg and "DeepseekV3ForCausalLM" in msg
    assert not any("forward" in mod.__dict__ for mod in m.modules())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    with torch.no_grad():
        assert torch.equal(m(ids).logits, logits)


def test_loss_only_patch_serves_a_dense_model():
    ref = other_model("llama").train()
    m = copy.deepcopy(ref)
    report = dsmath_kernels.patch(m, routing=False, experts=False)
    assert report.paths() == [""] and report.patched[0][1] == "loss"
    ids = tokens()
    out_p, out_r = m(ids, labels=ids), ref(ids, labels=ids)
    assert out_p.logits is None and rel_err(out_p.loss, out_r.loss) <= REL
    out_p.loss.backward()
    out_r.loss.backward()
    for (name, p), (_, r) in zip(m.named_parameters(), ref.named_parameters()):
        assert rel_err(p.grad, r.grad) <= REL, name


def test_transformers_4_modulelist_experts_are_refused_clearly():
    """transformers < 5 kept a ModuleList of per-expert MLPs and an nn.Linear gate: refused, named, unchanged."""
    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = (torch.nn.Linear(8, 4), torch.nn.Linear(8, 4),
                                                            torch.nn.Linear(4, 8))

    block = torch.nn.Module()
    block.gate = torch.nn.Linear(8, 4, bias=False)
    block.experts = torch.nn.ModuleList([Mlp() for _ in range(4)])
    with pytest.raises(UnsupportedModelError, match="transformers < 5 keeps a ModuleList"):
        dsmath_kernels.patch(block)
    assert not any("forward" in mod.__dict__ for mod in block.modules())


def test_not_a_model_is_refused_by_name():
    with pytest.raises(TypeError, match="model"):
        dsmath_kernels.patch("deepseek_v3")


def test_experts_that_do_not_fit_are_left_with_the_reason():
    ref = hf_model("tiny-qwen3", hidden_act="gelu")
    m, report = patched_pair(ref)
    assert report.paths("experts") == [] and report.paths("router") == ["model.layers.0.mlp.gate"]
    assert all("activation" in r for _, w, r in report.left if w == "experts")
    ids = tokens()
    with torch.no_grad():
        assert rel_err(m(ids).logits, ref(ids).logits) <= REL


@pytest.mark.parametrize("model_type,kw", [
    ("mixtral", {"num_local_experts": 8, "num_experts_per_tok": 2}),  # softmax top-k, always renormalized
    ("olmoe", {"num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": False}),
    ("glm4_moe", {"n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_group": 2,
                  "topk_group": 1, "first_k_dense_replace": 0, "routed_scaling_factor": 1.5, "head_dim": 16}),
])
def test_other_transformers_moe_models_are_probed_and_match(model_type, kw):
    ref = other_model(model_type, **kw)
    m, report = patched_pair(ref)
    assert len(report.paths("router")) == 2 and len(report.paths("experts")) == 2
    assert all(k.endswith("(probed)") for _, w, k in report.patched if w == "router")
    ids = tokens()
    with torch.no_grad():
        assert rel_err(m(ids).logits, ref(ids).logits) <= REL
    m.train()
    ref.train()
    out_p, out_r = m(ids, labels=ids), ref(ids, labels=ids)
    assert rel_err(out_p.loss, out_r.loss) <= REL
    out_p.loss.backward()
    out_r.loss.backward()
    assert_same_grads(m, ref)


def test_patch_class_before_loading_and_unpatch_class():
    ref = hf_model("tiny-qwen3")
    ids = tokens()
    with torch.no_grad():
        logits = ref(ids).logits
    try:
        report = dsmath_kernels.patch_class("qwen3_moe")
        assert [c for c, _, _ in report.patched] == ["Qwen3MoeTopKRouter", "Qwen3MoeExperts", "Qwen3MoeForCausalLM"]
        dsmath_kernels.patch_class("qwen3_moe")  # twice: harmless
        m = hf_model("tiny-qwen3")  # built after patching: takes the dsmath forwards
        assert not any("forward" in mod.__dict__ for mod in m.modules())
        assert type(m.model.layers[0].mlp.gate).forward._dsmath_kernel == "route_topk"
        with torch.no_grad():
            assert rel_err(m(ids).logits, logits) <= REL
        m.train()
        assert m(ids, labels=ids).logits is None  # fused loss
        assert dsmath_kernels.patch(m).paths() != []  # instance patching on top: reported, nothing doubled
    finally:
        restored = dsmath_kernels.unpatch_class("qwen3_moe")
    assert sorted(restored) == ["Qwen3MoeExperts", "Qwen3MoeForCausalLM", "Qwen3MoeTopKRouter"]
    with torch.no_grad():
        assert torch.equal(hf_model("tiny-qwen3")(ids).logits, logits)


def test_patch_class_warns_when_an_instance_does_not_fit():
    ref = hf_model("tiny-qwen3", hidden_act="gelu")
    ids = tokens()
    with torch.no_grad():
        logits = ref(ids).logits
    try:
        dsmath_kernels.patch_class("qwen3_moe", loss=False)
        with pytest.warns(RuntimeWarning, match="moe_experts.*activation"), torch.no_grad():
            assert rel_err(ref(ids).logits, logits) <= REL
    finally:
        dsmath_kernels.unpatch_class("qwen3_moe")


def test_patch_class_refuses_unknown_model_types():
    with pytest.raises(ValueError, match="model_type"):
        dsmath_kernels.patch_class("llama")


def test_loss_options_match_transformers():
    """num_items_in_batch, shift_labels, return_dict=False and the Qwen3 router aux loss, as the unpatched model."""
    ref = hf_model("tiny-qwen3").train()
    m, _ = patched_pair(ref)
    ids = tokens()
    n = torch.tensor(7.0)
    for kw in ({"labels": ids, "num_items_in_batch": n}, {"labels": ids, "shift_labels": ids.roll(-1, 1)},
               {"labels": ids, "output_router_logits": True}):
        out_p, out_r = m(ids, **kw), ref(ids, **kw)
        assert rel_err(out_p.loss, out_r.loss) <= REL, kw
        if kw.get("output_router_logits"):
            assert out_p.aux_loss is not None and rel_err(out_p.aux_loss, out_r.aux_loss) <= REL
    tup = m(ids, labels=ids, return_dict=False)
    assert isinstance(tup, tuple) and rel_err(tup[0], ref(ids, labels=ids).loss) <= REL
    with torch.no_grad():
        full = m(ids, labels=ids, skip_logits=False)  # logits wanted in training: the unpatched computation
    assert full.logits is not None and rel_err(full.loss, ref(ids, labels=ids).loss) <= REL


def test_activation_checkpointing_grads_match():
    ref = hf_model("tiny-v3").train()
    m, _ = patched_pair(ref)
    m.gradient_checkpointing_enable()  # the patched ops recompute deterministically
    ids = tokens()
    out_p, out_r = m(ids, labels=ids, use_cache=False), ref(ids, labels=ids, use_cache=False)
    assert rel_err(out_p.loss, out_r.loss) <= REL
    out_p.loss.backward()
    out_r.loss.backward()
    assert_same_grads(m, ref)


def test_generate_matches_unpatched():
    ref = hf_model("tiny-v3")
    m, _ = patched_pair(ref)
    ids = tokens(B=2, T=5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(m.generate(ids, **kw), ref.generate(ids, **kw))


def test_bf16_autocast_training_step_close_to_unpatched():
    ref = hf_model("tiny-v3").train()
    m, _ = patched_pair(ref)
    ids = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_p, out_r = m(ids, labels=ids), ref(ids, labels=ids)
    assert abs(out_p.loss.item() - out_r.loss.item()) <= 2e-2 * abs(out_r.loss.item())
    out_p.loss.backward()
    out_r.loss.backward()
    g_p = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
    g_r = torch.cat([p.grad.flatten() for p in ref.parameters() if p.grad is not None])
    assert ((g_p - g_r).norm() / g_r.norm()).item() <= 5e-2


def test_kernel_library_does_not_import_transformers():
    code = "import sys, dsmath_kernels; sys.exit('transformers' in sys.modules or 'model' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-v2", "tiny-v3", "tiny-qwen3"])
def test_torch_compile_train_step_and_eval_logits(preset):
    """The patched model traces whole (fullgraph, aot_eager: dynamo + fake impls + autograd, without inductor's
    C++ build), and its loss, gradients and eval logits equal the eager unpatched model's. ~5-10 s each."""
    torch._dynamo.reset()
    one_layer = {"num_hidden_layers": 1, "first_k_dense_replace": 0} if preset != "tiny-qwen3" else \
        {"num_hidden_layers": 1, "mlp_only_layers": []}
    ref = hf_model(preset, **one_layer).train()
    m, report = patched_pair(ref)
    assert len(report.paths("experts")) == 1
    ids = tokens()
    step = torch.compile(m, backend="aot_eager", fullgraph=True)
    out_p, out_r = step(ids, labels=ids), ref(ids, labels=ids)
    assert rel_err(out_p.loss, out_r.loss) <= REL
    out_p.loss.backward()
    out_r.loss.backward()
    assert_same_grads(m, ref)
    if preset == "tiny-qwen3":  # eval mode recompiles; once is enough to cover it
        m.eval()
        ref.eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback taken
            assert rel_err(step(ids).logits, ref(ids).logits) <= REL


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tiny-v3", "tiny-qwen3"])
def test_cuda_patched_model_matches_unpatched(preset):
    """On a GPU the patched model runs the CUDA route_topk and the Triton grouped GEMMs and GRPO/LM-head kernels."""
    ref = hf_model(preset).cuda().train()
    m, report = patched_pair(ref)
    assert report.paths("experts")
    ids = tokens().cuda()
    out_p, out_r = m(ids, labels=ids), ref(ids, labels=ids)
    assert out_p.logits is None and rel_err(out_p.loss, out_r.loss) <= REL
    out_p.loss.backward()
    out_r.loss.backward()
    assert_same_grads(m, ref)
    m.eval()
    ref.eval()
    with torch.no_grad():
        assert rel_err(m(ids).logits, ref(ids).logits) <= REL
