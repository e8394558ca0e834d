"""Data-parallel GRPO on CPU: two gloo processes under torchrun with the policy sharded by FSDP2 give the same
loss, metrics and gradients as one process on the same batch (train/dist_check.py), for every loss type; and the
whole training loop (generation on un-sharded live weights, checkpointing) runs under torchrun."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _run(cmd, timeout=300):
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _torchrun(n):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]


def test_two_ranks_match_one_process(tmp_path):
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    _run([sys.executable, "-m", "train.dist_check", "--out", one])
    _run(_torchrun(2) + ["-m", "train.dist_check", "--out", two])
    a, b = torch.load(one), torch.load(two)
    assert a["world"] == 1 and b["world"] == 2
    for lt in ("grpo", "dapo", "dr_grpo"):
        for k, v in a[lt]["metrics"].items():
            assert b[lt]["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-7), (lt, k)
        for name, g in a[lt]["grads"].items():
            torch.testing.assert_close(b[lt]["grads"][name], g, rtol=1e-4, atol=1e-7, msg=f"{lt} {name}")
        assert any(g.abs().sum() > 0 for g in a[lt]["grads"].values())


DETERMINISTIC = ("step", "reward_mean", "reward_std", "accuracy", "zero_var_frac", "resp_len", "loss", "kl", "clip",
                 "entropy", "grad_norm", "lr", "logprob_gap")


def test_grpo_loop_under_torchrun_and_exact_resume_from_sharded_checkpoints(tmp_path):
    """Two ranks: the first step (identical weights) matches one process; a run killed after step 3 (last checkpoint
    at step 2: DCP shards of the fp32 master weights and AdamW state, one file per rank) and restarted reproduces
    the uninterrupted run's metrics exactly, reference model (bf16-free here: fp32 on a CPU) included."""
    flags = ["--config", "toy", "--warmstart-steps", "3", "--problems-per-step", "4", "--group-size", "4",
             "--beta", "0.04", "--save-every", "2", "--steps", "4"]
    _run([sys.executable, "-m", "train.grpo", *flags, "--steps", "1", "--out", str(tmp_path / "one")])
    _run(_torchrun(2) + ["-m", "train.grpo", *flags, "--out", str(tmp_path / "two")])
    _run(_torchrun(2) + ["-m", "train.grpo", *flags, "--stop-after", "3", "--out", str(tmp_path / "killed")])
    ck = tmp_path / "killed" / "ckpt"
    assert open(ck / "latest").read() == "step_000002" and not (tmp_path / "killed" / "hf").exists()
    assert sorted(f.name for f in (ck / "step_000002").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (ck / "step_000002" / "trainer_state.pt").exists() and (ck / "step_000002" / "config.json").exists()
    _run(_torchrun(2) + ["-m", "train.grpo", *flags, "--out", str(tmp_path / "killed")])
    one, two, resumed = ([json.loads(x) for x in open(tmp_path / d / "metrics.jsonl")]
                         for d in ("one", "two", "killed"))
    assert [r["step"] for r in two] == [r["step"] for r in resumed] == [1, 2, 3, 4]
    for k in ("reward_mean", "accuracy", "resp_len", "zero_var_frac"):
        assert two[0][k] == pytest.approx(one[0][k]), k
    for k in ("loss", "kl", "entropy"):
        assert two[0][k] == pytest.approx(one[0][k], rel=1e-4, abs=1e-6), k
    for a, b in zip(two, resumed):
        assert {k: a[k] for k in DETERMINISTIC} == {k: b[k] for k in DETERMINISTIC}, a["step"]
    assert all(len(r["peak_mem_gib_ranks"]) == 2 for r in two)
    assert (tmp_path / "two" / "hf" / "step_000004" / "model.safetensors").exists()
