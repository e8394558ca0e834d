"""Tests for the GRPO trainer (train/grpo.py, train/config.py, train/plot.py): config presets/files/flags, LR
schedule, batch packing, loss normalisation under micro-batching and group dropping, exact resume after a kill,
checkpoints loadable by our model and by transformers, and the plot."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

from train.config import PRESETS, GRPOConfig, parse_config
from train.grpo import backward_minibatch, lr_factor, pack, run, trim


def test_config_presets_files_and_flags(tmp_path):
    d = parse_config([])
    assert (d.group_size, d.beta, d.lr, d.mu, d.loss_type) == (64, 0.04, 1e-6, 1, "grpo")  # DeepSeekMath
    dapo = parse_config(["--config", "dapo"])
    assert (dapo.eps_low, dapo.eps_high, dapo.loss_type, dapo.drop_equal_groups) == (0.2, 0.28, "dapo", True)
    assert parse_config(["--config", "dr_grpo"]).normalize == "none"
    toy = parse_config(["--config", "toy", "--group-size", "4", "--drop-equal-groups", "true", "--threads", "none"])
    assert toy.group_size == 4 and toy.drop_equal_groups is True and toy.threads is None and toy.data == "toy"
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"lr": 2e-6, "beta": 0.0}))
    c = parse_config(["--config", str(f), "--lr", "3e-6"])
    assert c.lr == 3e-6 and c.beta == 0.0  # flags beat the file
    f.write_text(json.dumps({"learning_rate": 1}))
    with pytest.raises(ValueError, match="unknown fields"):
        parse_config(["--config", str(f)])
    with pytest.raises(ValueError, match="loss_type"):
        parse_config(["--loss-type", "ppo"])
    with pytest.raises(ValueError, match="neither"):
        parse_config(["--config", "nope"])
    assert set(PRESETS) >= {"deepseekmath", "dapo", "dr_grpo", "toy"}


def test_lr_schedule():
    c = GRPOConfig(steps=10, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    f = [lr_factor(s, c) for s in range(10)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[2:], f[3:])) and lr_factor(10, c) == pytest.approx(0.1)
    assert lr_factor(7, GRPOConfig(warmup_steps=0)) == 1.0


def test_pack_aligns_targets_mask_and_logprobs():
    prompts = [[5, 6, 7], [8]]
    comps = [SimpleNamespace(token_ids=[10, 11], token_logprobs=[-1.0, -2.0]),
             SimpleNamespace(token_ids=[12, 13, 14, 1], token_logprobs=[-3.0, -4.0, -5.0, -6.0])]
    b = pack(prompts, comps, pad=2, device="cpu")
    assert b["ids"].shape == b["targets"].shape == b["mask"].shape == (2, 4)
    assert b["targets"][b["mask"]].tolist() == [10, 11, 12, 13, 14, 1]  # exactly the completion tokens
    assert b["engine_lp"][b["mask"]].tolist() == [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]
    assert b["ids"][0].tolist() == [5, 6, 7, 10] and b["ids"][1].tolist() == [8, 12, 13, 14]
    t = trim({**b, "adv": torch.zeros(2)}, slice(0, 1))
    assert t["ids"].shape == (1, 4) and t["adv"].shape == (1,)  # row 0's completion ends at position 3


@pytest.fixture(scope="module")
def tiny_policy():
    from model import MoEForCausalLM
    from train.grpo import Policy

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is far faster on a shared machine
    torch.manual_seed(0)
    yield Policy(MoEForCausalLM.from_preset("tiny"))
    torch.set_num_threads(threads)


def _grads(policy, b, cfg):
    policy.zero_grad(set_to_none=True)
    stats = {}
    backward_minibatch(policy, b, slice(0, b["ids"].shape[0]), cfg, stats)
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}, stats


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_micro_batching_and_dropped_groups_do_not_change_the_gradient(tiny_policy, loss_type):
    from train.dist_check import fixed_batch

    b = fixed_batch()  # rows 2, 3 fully masked (a dropped group)
    cfg = GRPOConfig(loss_type=loss_type, beta=0.04, max_tokens=16, micro_batch=8)
    full, stats = _grads(tiny_policy, b, cfg)
    cfg.micro_batch = 3
    micro, _ = _grads(tiny_policy, b, cfg)
    for n in full:
        torch.testing.assert_close(micro[n], full[n], rtol=1e-4, atol=1e-7)
    keep = b["mask"].any(1)  # removing the masked rows: same gradient for the per-sequence and token means
    if loss_type != "dr_grpo":
        cfg.micro_batch = 8
        kept, _ = _grads(tiny_policy, {k: v[keep] for k, v in b.items()}, cfg)
        for n in full:
            torch.testing.assert_close(kept[n], full[n], rtol=1e-4, atol=1e-7)
    assert stats["tokens"] == float(b["mask"].sum())


def _toy(out, **kw):
    base = ["--config", "toy", "--out", str(out), "--steps", "4", "--warmstart-steps", "3", "--problems-per-step",
            "4", "--group-size", "4", "--beta", "0.04", "--save-every", "2", "--mu", "2", "--minibatches", "2"]
    return parse_config(base + [x for k, v in kw.items() for x in ("--" + k.replace("_", "-"), str(v))])


DETERMINISTIC = ("step", "reward_mean", "reward_std", "accuracy", "zero_var_frac", "resp_len", "loss", "kl", "clip",
                 "entropy", "grad_norm", "lr", "logprob_gap")


def test_resume_after_kill_reproduces_the_uninterrupted_run(tmp_path):
    full = run(_toy(tmp_path / "a"))
    assert [m["step"] for m in full] == [1, 2, 3, 4]
    killed = run(_toy(tmp_path / "b", stop_after=3))  # checkpoint at 2, then step 3, then "killed"
    assert len(killed) == 3
    resumed = run(_toy(tmp_path / "b"))
    assert [m["step"] for m in resumed] == [3, 4]
    lines = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]  # the killed run's step 3 was replaced
    for a, b in zip(full, lines):
        assert {k: a[k] for k in DETERMINISTIC} == {k: b[k] for k in DETERMINISTIC}
    ck = tmp_path / "b" / "ckpt"
    assert open(ck / "latest").read() == "step_000004"
    assert sorted(os.listdir(ck)) == ["latest", "step_000002", "step_000004"]


def test_export_loads_in_our_model_and_transformers_with_equal_logits(tmp_path):
    """The run's automatic export of its final checkpoint (OUT/hf/step_N, float32 on a CPU) and `python -m
    train.export RUN OUT --dtype bfloat16` with several shards: the files hold the checkpoint's master weights
    (rounded to bf16, DeepSeek routers kept fp32), config.json states the dtype, transformers and our model give
    equal logits, the tokenizer and generation_config come along, and our LLM generates from the directory."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from model import LLM, MoEForCausalLM, SamplingParams
    from train.export import main as export_main

    run(_toy(tmp_path, steps=2, mu=1, minibatches=1))
    dcp_to_torch_save(str(tmp_path / "ckpt" / "step_000002"), str(tmp_path / "master.pt"))
    master = {k.removeprefix("lm."): v for k, v in torch.load(tmp_path / "master.pt")["model"].items()}
    auto, bf16 = tmp_path / "hf" / "step_000002", tmp_path / "bf16"
    export_main([str(tmp_path), str(bf16), "--dtype", "bfloat16", "--max-shard-gib", str(40_000 / 2**30)])
    assert (bf16 / "model.safetensors.index.json").exists() and len(list(bf16.glob("model-*.safetensors"))) > 2
    transformers = pytest.importorskip("transformers")
    ids = torch.tensor([[20, 21, 22, 23, 9, 40]])
    for d, dtype in ((auto, "float32"), (bf16, "bfloat16")):
        cfg = json.load(open(d / "config.json"))
        assert cfg["dtype"] == cfg["torch_dtype"] == dtype
        ours = MoEForCausalLM.from_pretrained(str(d), dtype=torch.float32)
        for name, p in ours.state_dict().items():
            want = master[name] if dtype == "float32" or name.endswith("mlp.gate.weight") else \
                master[name].to(torch.bfloat16).float()
            assert torch.equal(p, want), (d.name, name)
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
        tok = transformers.AutoTokenizer.from_pretrained(str(d))
        assert tok.decode(tok.encode("\\boxed{7}")) == "\\boxed{7}"
        gen = transformers.GenerationConfig.from_pretrained(str(d))
        assert gen.eos_token_id == ours.config.eos_token_id
    out = LLM(str(bf16), device="cpu", cpu_kv_cache_gib=0.01).generate(
        ["1+2="], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_plot_writes_png(tmp_path):
    from train.plot import plot, smooth

    with open(tmp_path / "metrics.jsonl", "w") as f:
        for s in range(1, 8):
            f.write(json.dumps({"step": s, "reward_mean": s / 10, "accuracy": s / 10, "kl": 0.01 * s,
                                "resp_len": 10 + s, "entropy": 1.0, "clip": 0.0}) + "\n")
    path = plot(str(tmp_path))
    assert os.path.getsize(path) > 1000
    assert smooth([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]


def test_bf16_autocast_and_activation_checkpointing(tiny_policy):
    from train.dist_check import fixed_batch

    b = fixed_batch()
    cfg = GRPOConfig(beta=0.04, max_tokens=16, micro_batch=8)
    ref, _ = _grads(tiny_policy, b, cfg)
    bf16, _ = _grads(tiny_policy, b, GRPOConfig(beta=0.04, max_tokens=16, micro_batch=8, dtype="bfloat16"))
    tiny_policy.lm.gradient_checkpointing = True
    try:
        ckpt, _ = _grads(tiny_policy, b, cfg)
    finally:
        tiny_policy.lm.gradient_checkpointing = False
    for n, g in ref.items():
        assert ((bf16[n] - g).norm() / g.norm()) < 0.1, n  # bf16 compute, fp32 weights and gradients
        assert bf16[n].dtype == torch.float32
        torch.testing.assert_close(ckpt[n], g, rtol=1e-5, atol=1e-7)
