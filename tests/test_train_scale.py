"""GRPO at scale, proven on a CPU (issue 13): sharded build (world size 1 and 4 give identical weights, from a
checkpoint's slices or a preset's row-wise init; the bf16 rollout copy gathered unit by unit equals the cast master
weights), errors before any weight is allocated, the engine's sleep/wake_up, the memory plan, and the per-rank
memory proof at world size 4 (CI-sized; bench/grpo_memory.py --size 250m is the full one, bench/RESULTS.md)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_models import make_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "python"), ROOT, os.environ.get("PYTHONPATH", "")])}

pytestmark = pytest.mark.usefixtures("one_thread")


def _checkpoint(path, **overrides):
    """tiny-v3 (MLA, q low-rank, fp32 routers, a routing-bias buffer) with 6 experts: uneven over 4 ranks."""
    m = make_model("tiny-v3", n_routed_experts=6, n_group=3, topk_group=2, **overrides)
    with torch.no_grad():
        for _, b in m.named_buffers():
            b.normal_()
    m.save_pretrained(str(path), max_shard_bytes=150_000)  # several files
    return m


def test_sharded_build_is_the_same_at_world_size_1_and_4(tmp_path):
    from train.dist_check import sharded_weights

    ref = _checkpoint(tmp_path / "ck")
    models = f"tiny-v3,tiny-qwen3,{tmp_path / 'ck'}"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                        "-m", "train.dist_check", "--weights", "--model", models, "--out", str(tmp_path / "w4.pt")],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sharded_weights(models, str(tmp_path / "w1.pt"))  # one process, no FSDP
    one, four = torch.load(tmp_path / "w1.pt"), torch.load(tmp_path / "w4.pt")
    assert (one["world"], four["world"]) == (1, 4)
    want = {**dict(ref.named_parameters()), **dict(ref.named_buffers())}
    for model in models.split(","):
        w1, w4 = one[model]["weights"], four[model]["weights"]
        assert set(w1) == set(w4) and len(w1) > 20
        for name, t in w1.items():
            assert torch.equal(t, w4[name]), (model, name)  # bitwise: row-wise init, slice-wise reads
            rollout = four[model]["rollout"][name]  # gathered FSDP unit by unit (bf16 all-gathers, fp32 routers)
            fp32 = name.endswith(("mlp.gate.weight", "e_score_correction_bias")) and model != "tiny-qwen3"
            assert rollout.dtype == (torch.float32 if fp32 else torch.bfloat16), (model, name)
            assert torch.equal(rollout, t.to(rollout.dtype)), (model, name)
            if os.path.isdir(model):
                assert torch.equal(t, want[name].detach()), name  # exactly the checkpoint's tensors
    init = one["tiny-v3"]["weights"]
    assert init["model.layers.1.mlp.experts.gate_up_proj"].std() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(init["model.norm.weight"], torch.ones(64))


def _toy(tmp_path, model, **kw):
    from train.config import parse_config

    flags = ["--config", "toy", "--model", str(model), "--tokenizer", "char", "--out", str(tmp_path / "run"),
             "--steps", "1", "--warmstart-steps", "0", "--problems-per-step", "4", "--group-size", "2"]
    return parse_config(flags + [x for k, v in kw.items() for x in ("--" + k.replace("_", "-"), str(v))])


@pytest.fixture
def no_allocation(monkeypatch):
    """Fails the test if the trainer materialises any weight."""
    import train.grpo as grpo

    def refuse(*a, **k):
        raise AssertionError("a weight was materialised before the error")

    monkeypatch.setattr(grpo, "materialize", refuse)


def _rewrite(path, fn):
    """Apply fn to the {name: tensor} of the checkpoint file holding layer 1's kv_b_proj; -> that file's name."""
    from safetensors.torch import load_file, save_file

    index = json.load(open(path / "model.safetensors.index.json"))["weight_map"]
    fname = index["model.layers.1.self_attn.kv_b_proj.weight"]
    tensors = load_file(str(path / fname))
    fn(tensors)
    save_file(tensors, str(path / fname), metadata={"format": "pt"})
    return fname


def test_bad_checkpoints_fail_before_any_weight_is_materialised(tmp_path, no_allocation):
    from train.grpo import run

    name = "model.layers.1.self_attn.kv_b_proj.weight"
    cases = {
        "shape": (lambda t: t.__setitem__(name, torch.zeros(7, 32)), [name, "shape [7, 32]", "needs"]),
        "fp8": (lambda t: t.__setitem__(name, t[name].to(torch.float8_e4m3fn)), [name, "F8_E4M3", "quantised"]),
        "unknown": (lambda t: t.__setitem__("model.layers.1.mlp.extra.weight", torch.zeros(2)),
                    ["model.layers.1.mlp.extra.weight", "unexpected"]),
        "missing": (lambda t: t.pop(name), [name, "missing"]),
    }
    for case, (fn, words) in cases.items():
        d = tmp_path / case
        _checkpoint(d)
        fname = _rewrite(d, fn)
        with pytest.raises(ValueError) as e:
            run(_toy(tmp_path / f"run_{case}", d))
        msg = str(e.value)
        assert all(w in msg for w in words), (case, msg)
        if case != "missing":  # a missing tensor has no file; the others name theirs
            assert fname in msg, (case, msg)
    d = tmp_path / "quantised"
    _checkpoint(d)
    cfg = json.load(open(d / "config.json"))
    json.dump({**cfg, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}},
              open(d / "config.json", "w"))
    with pytest.raises(ValueError, match=r"config\.json: quantization_config \(fp8\)"):
        run(_toy(tmp_path / "run_q", d))


def test_world_size_must_divide_the_problems_before_any_weight(tmp_path, no_allocation, monkeypatch):
    import train.grpo as grpo

    monkeypatch.setattr(grpo, "rank_world", lambda: (0, 3))
    with pytest.raises(ValueError, match="problems_per_step=4 must divide by the world size 3"):
        grpo.run(_toy(tmp_path, "tiny"))


def test_engine_sleep_and_wake_up():
    from model.engine import LLM, SamplingParams

    m = make_model("tiny-v2")
    llm = LLM(m, num_blocks=32, block_size=16, max_num_seqs=4)
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)]
    weights = {k: v.clone() for k, v in m.state_dict().items()}
    llm.sleep(level=2)  # KV cache and weights discarded
    assert llm.runner.kv_cache is None and all(t.is_meta for t in m.parameters())
    with pytest.raises(RuntimeError, match="asleep"):
        llm.generate(prompts, p, use_tqdm=False)
    with pytest.raises(RuntimeError, match="wake the weights before the KV cache"):
        llm.wake_up(["kv_cache"])
    llm.wake_up(["weights"])
    assert not any(t.is_meta for t in m.parameters())
    m.load_state_dict(weights)  # a trainer loads its new policy here
    llm.wake_up(["kv_cache"])
    assert llm.runner.kv_cache is not None and llm.block_manager.num_blocks == 32
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)] == want
    llm.sleep(level=1)  # weights to host memory (already there on a CPU), kept
    llm.wake_up()
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)] == want
    llm.add_request([5, 6], p)
    with pytest.raises(RuntimeError, match="still running"):
        llm.sleep()
    with pytest.raises(ValueError, match="level"):
        llm.sleep(level=3)


def test_plan_memory_prints_the_plan_per_rank(capsys):
    from train.grpo import main

    main(["--plan-memory", "--model", "v2-lite", "--world-size", "8", "--gpu-gib", "79.6"])
    out = capsys.readouterr().out
    p = json.loads(out.strip().splitlines()[-1])
    assert "Memory plan per rank: deepseek_v2 15.71 B parameters, 8 rank(s)" in out and "fits" in out
    P, G = 15_706_484_224, 2**30
    r, u = p["rollout"], p["update"]
    assert r["policy master weights (fp32 shards)"] == pytest.approx(4 * P / 8 / G)
    assert r["AdamW moments (fp32 shards)"] == pytest.approx(8 * P / 8 / G)
    assert r["reference (shards)"] == pytest.approx(2 * P / 8 / G)  # bf16, the default on GPUs
    assert r["rollout weights (full copy)"] == pytest.approx(2 * P / G)
    assert u["gradients (fp32 shards)"] == pytest.approx(4 * P / 8 / G) and "KV cache" not in u
    assert p["fits"] and 5 < r["KV cache"] < 30 and p["kv_tokens"] >= p["rollout_tokens"]
    assert p["peak_allocated_gib"] + p["outside_gib"] <= 79.6
    main(["--plan-memory", "--model", "qwen3-30b-a3b", "--world-size", "8", "--gpu-gib", "79.6"])
    q = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not q["fits"] and q["params_b"] == pytest.approx(30.53, abs=0.01)  # the rollout copy alone: 57 GiB
    main(["--plan-memory", "--model", "qwen3-30b-a3b", "--world-size", "8", "--gpu-gib", "79.6",
          "--rollout-offload", "true", "--ref-offload", "true"])
    q = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert q["fits"] and q["rollout"]["AdamW moments (fp32 shards)"] == 0 and q["host_train_state_gib"] > 40
    main(["--plan-memory", "--model", "v2-lite", "--world-size", "8", "--gpu-gib", "79.6", "--micro-batch", "64",
          "--activation-checkpointing", "false"])
    assert "DOES NOT FIT" in capsys.readouterr().out  # 98K tokens of saved activations


def test_per_rank_memory_at_world_size_4_stays_under_2x_the_fp32_model(tmp_path):
    """CI-sized proof: an 82 M-parameter Qwen3-MoE-layout checkpoint, one step with beta > 0, the end-of-run
    checkpoint and export, under torchrun with 4 gloo ranks. Each worker's peak RSS above the runtime's own (the
    same run on a 0.1 M-parameter checkpoint, in the same workers) stays under 2x the fp32 model (measured ~1.6x;
    a full fp32 copy of the policy per rank would add 0.75x, an fp32 rollout copy 0.5x, unsharded AdamW 1.5x)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from grpo_memory import main

    res = main(["--size", "ci", "--world", "4", "--one-launch", "--workdir", str(tmp_path)])
    row = res["rows"][0]
    assert res["params"] > 80e6 and row["world"] == 4 and len(row["per_rank"]) == 4
    assert row["ok"] and row["excess_x"] <= 2.0, row
    assert row["excess_x"] > 1.0, row  # the sharded state itself is measured, not noise
    metrics = [json.loads(x) for x in open(tmp_path / "run_ci_w4" / "metrics.jsonl")]
    assert metrics[0]["peak_mem_gib"] == max(metrics[0]["peak_mem_gib_ranks"]) and metrics[0]["load_peak_mem_gib"] > 0
    assert os.path.exists(tmp_path / "run_ci_w4" / "hf" / "step_000001" / "model.safetensors")


@pytest.mark.slow
def test_per_rank_memory_250m_at_world_size_4(tmp_path):
    """The issue's proof: ~250 M parameters (~1 GB fp32 on disk) at world size 4 (bench/RESULTS.md has 1, 2, 4)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from grpo_memory import main

    row = main(["--size", "250m", "--world", "4", "--workdir", str(tmp_path)])["rows"][0]
    assert row["ok"] and row["excess_x"] <= 2.0, row


@pytest.mark.gpu
def test_one_process_on_gpu_trains_in_bf16_with_graphs_and_exports_bf16(tmp_path):
    """CUDA defaults: bf16 compute over fp32 master weights (autocast in one process), a bf16 rollout copy whose
    decode runs in CUDA graphs re-captured after every wake, a KV budget from mem_get_info, a bf16 export."""
    from train.config import parse_config
    from train.grpo import compute_dtype, run

    cfg = parse_config(["--config", "toy", "--out", str(tmp_path), "--steps", "2", "--warmstart-steps", "3",
                        "--problems-per-step", "4", "--group-size", "4", "--save-every", "2",
                        "--engine-memory-fraction", "0.1"])
    assert compute_dtype(cfg) == torch.bfloat16
    hist = run(cfg)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in hist)
    assert all(m["rollout_cuda_graphs"] > 0 and m["peak_mem_gib"] > 0 for m in hist)
    assert json.load(open(tmp_path / "hf" / "step_000002" / "config.json"))["dtype"] == "bfloat16"


@pytest.mark.gpu
def test_torchrun_on_gpu_graphs_mixed_precision_and_offload_give_the_same_run(tmp_path):
    """torchrun (NCCL, FSDP2 bf16 mixed precision, fp32 routers): the distributed rollout captures CUDA graphs; with
    --rollout-offload (policy shards + AdamW to host during the rollout) and --ref-offload (FSDP2 CPU offload)
    the metrics are the same as without."""
    flags = ["--config", "toy", "--steps", "2", "--warmstart-steps", "3", "--problems-per-step", "4",
             "--group-size", "4", "--save-every", "0", "--model", "tiny-v3", "--engine-memory-fraction", "0.1"]
    runs = {}
    for name, extra in (("plain", []), ("offload", ["--rollout-offload", "true", "--ref-offload", "true"])):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                            "-m", "train.grpo", *flags, *extra, "--out", str(tmp_path / name)],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        runs[name] = [json.loads(x) for x in open(tmp_path / name / "metrics.jsonl")]
    for a, b in zip(runs["plain"], runs["offload"]):
        assert a["rollout_cuda_graphs"] > 0 and b["rollout_cuda_graphs"] > 0
        for k in ("reward_mean", "resp_len", "loss", "kl", "entropy", "grad_norm", "logprob_gap"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), k
    assert runs["offload"][1]["peak_mem_gib"] < runs["plain"][1]["peak_mem_gib"]
