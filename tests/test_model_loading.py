"""Checkpoint loading and saving: our save_pretrained -> transformers' from_pretrained gives the same logits
(round trip, single file and sharded with an index), fused-expert checkpoints load, bf16 loading keeps DeepSeek
routers in fp32, and bad checkpoints are refused with an error naming the culprit (missing / misshapen / unknown
tensor, unsupported model_type, pickle-only directory). The v2-lite preset is sized on the meta device only."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_model as tiny_make_model

from model import MoEForCausalLM
from model.presets import preset, preset_dict

transformers = pytest.importorskip("transformers")

FAMILIES = ["tiny-v2", "tiny-v3", "tiny-qwen3"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(name: str, **overrides) -> MoEForCausalLM:
    return tiny_make_model(name, norms=False, **overrides)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("shard_bytes", [None, 40_000])
@pytest.mark.parametrize("name", FAMILIES)
def test_save_then_transformers_loads_same_model(name, shard_bytes, tmp_path):
    ours = make_model(name)
    kw = {} if shard_bytes is None else {"max_shard_bytes": shard_bytes}
    ours.save_pretrained(str(tmp_path), **kw)
    sharded = os.path.exists(tmp_path / "model.safetensors.index.json")
    assert sharded == (shard_bytes is not None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 13))
    ref = logits(hf, ids)
    torch.testing.assert_close(logits(ours, ids), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    again = MoEForCausalLM.from_pretrained(str(tmp_path))  # and back into ours, bit for bit
    for (n, p), (n2, q) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert n == n2 and torch.equal(p, q), n


def test_fused_expert_layout_loads(tmp_path):
    """transformers' in-memory layout (mlp.experts.gate_up_proj [E, 2I, H], down_proj [E, H, I]) is accepted."""
    ours = make_model("tiny-v3")
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with open(tmp_path / "config.json", "w") as f:
        json.dump(preset_dict("tiny-v3"), f)
    again = MoEForCausalLM.from_pretrained(str(tmp_path))
    ids = torch.randint(0, 128, (1, 7))
    assert torch.equal(logits(again, ids), logits(ours, ids))


def test_bf16_load_keeps_router_fp32(tmp_path):
    make_model("tiny-v3").save_pretrained(str(tmp_path))
    m = MoEForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16
    gate = m.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.float32 and gate.e_score_correction_bias.dtype == torch.float32
    assert m.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    ids = torch.randint(0, 128, (1, 9))
    out, ref = logits(m, ids).float(), logits(MoEForCausalLM.from_pretrained(str(tmp_path)), ids)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 0.05


def _edit_checkpoint(path, fn):
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


@pytest.mark.parametrize("name", ["tiny-v2", "tiny-qwen3"])
def test_missing_tensor_is_named(name, tmp_path):
    make_model(name).save_pretrained(str(tmp_path))
    gone = "model.layers.2.mlp.experts.5.up_proj.weight"
    _edit_checkpoint(tmp_path, lambda t: t.pop(gone))
    with pytest.raises(ValueError, match=gone.replace(".", r"\.")):
        MoEForCausalLM.from_pretrained(str(tmp_path))


def test_missing_attention_tensor_is_named(tmp_path):
    make_model("tiny-v3").save_pretrained(str(tmp_path))
    gone = "model.layers.0.self_attn.kv_b_proj.weight"
    _edit_checkpoint(tmp_path, lambda t: t.pop(gone))
    with pytest.raises(ValueError, match=gone.replace(".", r"\.")):
        MoEForCausalLM.from_pretrained(str(tmp_path))


def test_misshapen_tensor_is_named(tmp_path):
    make_model("tiny-v2").save_pretrained(str(tmp_path))
    bad = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    _edit_checkpoint(tmp_path, lambda t: t.__setitem__(bad, t[bad][:-1].contiguous()))
    with pytest.raises(ValueError, match=bad.replace(".", r"\.") + r": shape \[39, 64\]"):
        MoEForCausalLM.from_pretrained(str(tmp_path))


def test_unknown_tensor_is_named_but_mtp_layers_are_ignored(tmp_path):
    make_model("tiny-v3").save_pretrained(str(tmp_path))
    _edit_checkpoint(tmp_path, lambda t: t.__setitem__("model.layers.3.embed_tokens.weight", torch.zeros(2, 2)))
    MoEForCausalLM.from_pretrained(str(tmp_path))  # layer 3 = DeepSeek-V3 MTP layer (past num_hidden_layers)
    _edit_checkpoint(tmp_path, lambda t: t.__setitem__("model.layers.0.self_attn.extra.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.extra\.weight"):
        MoEForCausalLM.from_pretrained(str(tmp_path))


def test_unsupported_model_type_and_pickle_refused(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump({**preset_dict("tiny-v2"), "model_type": "mixtral"}, f)
    with pytest.raises(ValueError, match="model_type: 'mixtral'"):
        MoEForCausalLM.from_pretrained(str(tmp_path))
    with open(tmp_path / "config.json", "w") as f:
        json.dump(preset_dict("tiny-v2"), f)
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="no safetensors"):
        MoEForCausalLM.from_pretrained(str(tmp_path))


def test_v2_lite_preset_shapes_on_meta():
    """DeepSeek-V2-Lite: ~15.7B parameters, ~2.4B active per token (6 of 64 routed experts; input embedding
    not counted). Built on the meta device: no memory."""
    cfg = preset("v2-lite")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok) == (27, 2048, 64, 6)
    assert (cfg.n_shared_experts, cfg.kv_lora_rank, cfg.vocab_size, cfg.q_lora_rank) == (2, 512, 102400, None)
    assert cfg.moe_layers == [False] + [True] * 26 and cfg.rope.kind == "yarn"
    with torch.device("meta"):
        m = MoEForCausalLM(cfg)
    total = sum(p.numel() for p in m.parameters())
    experts = sum(p.numel() for n, p in m.named_parameters() if ".experts." in n)
    active = total - experts * (64 - 6) / 64 - cfg.vocab_size * cfg.hidden_size
    assert 15.6e9 < total < 15.8e9, total
    assert 2.3e9 < active < 2.5e9, active


@pytest.mark.parametrize("bad, match", [
    ({"moe_layer_freq": 2}, "moe_layer_freq"),
    ({"topk_method": "noaux_tc"}, "topk_method"),
    ({"scoring_func": "sigmoid"}, "scoring_func"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope_scaling"),
])
def test_unsupported_config_fields_are_named(bad, match):
    from model.config import ModelConfig
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict(preset_dict("tiny-v2", **bad))


def test_config_aliases_and_qwen_fields():
    """Either spelling of the expert count (transformers' attribute_map), Qwen3 head_dim / mlp_only_layers /
    decoder_sparse_step, DeepSeek first_k_dense_replace, sliding window refused."""
    from model.config import ModelConfig
    q = ModelConfig.from_dict(preset_dict("tiny-qwen3", num_experts=6, decoder_sparse_step=2, mlp_only_layers=[]))
    assert q.num_experts == 6 and q.moe_layers == [False, True, False] and q.head_dim == 16
    q = ModelConfig.from_dict({k: v for k, v in preset_dict("tiny-qwen3").items() if k != "num_experts"}
                              | {"num_local_experts": 5, "mlp_only_layers": [0]})
    assert q.num_experts == 5 and q.moe_layers == [False, True, True]
    v3 = ModelConfig.from_dict({k: v for k, v in preset_dict("tiny-v3").items() if k != "n_routed_experts"}
                               | {"num_local_experts": 4, "first_k_dense_replace": 2})
    assert v3.num_experts == 4 and v3.moe_layers == [False, False, True] and v3.scoring == "sigmoid"
    with pytest.raises(ValueError, match="use_sliding_window"):
        ModelConfig.from_dict(preset_dict("tiny-qwen3", use_sliding_window=True))
