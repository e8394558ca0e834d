"""Our MoEForCausalLM against transformers 5.24 on tiny random checkpoints that transformers itself wrote
(save_pretrained, safetensors): logits in fp32 (max |ours - theirs| <= 1e-4 * max |theirs|, same argmax), final
hidden states, padding masks, YaRN (legacy `rope_scaling` as DeepSeek-V2's config.json ships it) at positions
past the original context, parameter gradients, and activation checkpointing. Parameter names equal transformers'
in-memory names, so gradients are compared name by name."""

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_models import randomize  # noqa: E402

from model import MoEForCausalLM  # noqa: E402
from model.presets import preset_dict  # noqa: E402

REL = 1e-4
YARN_V2 = {"type": "yarn", "factor": 8, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
           "mscale": 0.707, "mscale_all_dim": 0.707}
YARN_V3 = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
           "mscale": 1.0, "mscale_all_dim": 0.5}

CASES = {
    "v2-group-limited": ("tiny-v2", {}),
    "v2-greedy-yarn-bias": ("tiny-v2", {"topk_method": "greedy", "n_group": 1, "topk_group": 1,
                                        "routed_scaling_factor": 1.5, "max_position_embeddings": 128,
                                        "rope_scaling": YARN_V2, "attention_bias": True, "mlp_bias": True}),
    "v3": ("tiny-v3", {}),
    "v3-yarn-halves": ("tiny-v3", {"rope_interleave": False, "max_position_embeddings": 64, "rope_scaling": YARN_V3,
                                   "q_lora_rank": None, "first_k_dense_replace": 0, "attention_bias": True}),
    "qwen3": ("tiny-qwen3", {}),
    "qwen3-tied-sparse-step-bias": ("tiny-qwen3", {"tie_word_embeddings": True, "decoder_sparse_step": 2,
                                                   "mlp_only_layers": [], "norm_topk_prob": False,
                                                   "attention_bias": True}),
}


pytestmark = pytest.mark.usefixtures("one_thread")




def hf_checkpoint(tmp_path, preset: str, overrides: dict) -> tuple[str, torch.nn.Module]:
    """A tiny random transformers model saved with save_pretrained; config.json rewritten to the legacy
    rope_scaling + rope_theta form when YaRN is used (as DeepSeek-V2 ships it). Returns (dir, reloaded model)."""
    d = preset_dict(preset, **overrides)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**d))
    randomize(hf)
    path = str(tmp_path / f"hf_{preset}")
    hf.save_pretrained(path)
    if "rope_scaling" in overrides:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        params = cfg.pop("rope_parameters")
        cfg["rope_theta"] = params.pop("rope_theta")
        cfg["rope_scaling"] = dict(overrides["rope_scaling"])
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg, f)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf


def assert_logits_match(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert rel <= REL, f"{what}: max relative error {rel:.3g} > {REL}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1)), f"{what}: argmax differs"


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    preset, overrides = CASES[request.param]
    torch.manual_seed(1)
    path, hf = hf_checkpoint(tmp_path_factory.mktemp(request.param), preset, overrides)
    ours = MoEForCausalLM.from_pretrained(path)
    return request.param, hf, ours


def test_logits_match_transformers(pair):
    name, hf, ours = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, 23))
    with torch.no_grad():
        assert_logits_match(ours(ids).logits, hf(ids).logits, name)


def test_hidden_states_match_transformers(pair):
    name, hf, ours = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, 9))
    with torch.no_grad():
        ref = hf.model(ids).last_hidden_state
        out = ours(ids, return_hidden=True)
    assert out.logits is None
    rel = ((out.hidden - ref).abs().max() / ref.abs().max()).item()
    assert rel <= REL, f"{name}: hidden states differ, relative error {rel:.3g}"


def test_padding_mask_matches_transformers(pair):
    name, hf, ours = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, 12))
    for side in ("right", "left"):
        mask = torch.ones(2, 12, dtype=torch.long)
        if side == "right":
            mask[1, 8:] = 0
        else:
            mask[0, :3] = 0
        with torch.no_grad():
            ref, out = hf(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
        valid = mask.bool()
        assert_logits_match(out[valid], ref[valid], f"{name} with {side} padding")


@pytest.mark.parametrize("case", ["v2-greedy-yarn-bias", "v3-yarn-halves"])
def test_yarn_past_original_context(case, tmp_path):
    """Positions 0..47 and 80..127 / 16..63: well past original_max_position_embeddings = 16."""
    preset, overrides = CASES[case]
    path, hf = hf_checkpoint(tmp_path, preset, overrides)
    ours = MoEForCausalLM.from_pretrained(path)
    assert ours.config.rope.kind == "yarn"
    top = ours.config.max_position_embeddings
    ids = torch.randint(0, ours.config.vocab_size, (1, 48))
    pos = torch.arange(top - 48, top)[None]
    with torch.no_grad():
        assert_logits_match(ours(ids).logits, hf(ids).logits, f"{case} positions 0..47")
        assert_logits_match(ours(ids, position_ids=pos).logits, hf(ids, position_ids=pos).logits,
                            f"{case} positions {top - 48}..{top - 1}")


def test_gradients_match_transformers_and_reach_every_parameter(pair):
    name, hf, ours = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, 11))
    hf.train(), ours.train()
    hf.zero_grad(), ours.zero_grad()
    hf(ids).logits.float().logsumexp(-1).mean().backward()
    ours(ids).logits.float().logsumexp(-1).mean().backward()
    ref = dict(hf.named_parameters())
    for pname, p in ours.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient reaches {pname}"
        g = ref[pname].grad
        rel = ((p.grad - g).abs().max() / g.abs().max()).item()
        assert rel <= 1e-3, f"{name}: gradient of {pname} differs from transformers (relative error {rel:.3g})"
    hf.eval(), ours.eval()


@pytest.mark.parametrize("preset", ["tiny-v2", "tiny-qwen3"])
def test_activation_checkpointing_same_gradients(preset):
    torch.manual_seed(0)
    m = MoEForCausalLM.from_preset(preset).train()
    randomize(m)
    ids = torch.randint(0, m.config.vocab_size, (2, 10))
    grads = []
    for ckpt in (False, True):
        m.gradient_checkpointing = ckpt
        m.zero_grad()
        m(ids).logits.logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=lambda s, n=n: f"{n}: {s}")


@pytest.mark.parametrize("name", ["v2-lite", "tiny-v3-yarn", "qwen3-yarn"])
def test_rope_tables_match_transformers_at_real_scales(name):
    """inv_freq and cos/sin scaling of DeepSeek-V2-Lite's YaRN (factor 40 over 4K, mscale 0.707), a V3-style YaRN
    with mscale != mscale_all_dim, and Qwen3 YaRN, against transformers' own rope init and softmax scale."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from model.config import ModelConfig
    from model.layers.rope import inv_freq_and_scale
    d = {"v2-lite": preset_dict("v2-lite"),
         "tiny-v3-yarn": preset_dict("tiny-v3", max_position_embeddings=16384, rope_scaling={
             "type": "yarn", "factor": 4, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
             "mscale": 1.0, "mscale_all_dim": 0.8}),
         "qwen3-yarn": preset_dict("tiny-qwen3", max_position_embeddings=131072, rope_scaling={
             "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})}[name]
    hf_cfg = transformers.AutoConfig.for_model(**d)
    want_inv, want_scale = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    cfg = ModelConfig.from_dict(d)
    inv, scale = inv_freq_and_scale(cfg.rope)
    torch.testing.assert_close(inv, want_inv.float(), rtol=1e-6, atol=0)
    assert abs(scale - want_scale) < 1e-7
    if cfg.is_mla:
        mod = __import__(f"transformers.models.{d['model_type']}.modeling_{d['model_type']}", fromlist=["x"])
        want = mod.yarn_apply_mscale(hf_cfg.rope_parameters, cfg.qk_head_dim ** -0.5)
        assert abs(cfg.softmax_scale() - want) < 1e-9
