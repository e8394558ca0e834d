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


def test_grpo_loop_under_torchrun(tmp_path):
    """Two ranks, two steps of the toy run: the first step (identical weights) matches one process exactly; then a
    resume to step 3 under FSDP2."""
    flags = ["--config", "toy", "--steps", "2", "--warmstart-steps", "3", "--problems-per-step", "4",
             "--group-size", "4", "--beta", "0.04", "--save-every", "2"]
    _run([sys.executable, "-m", "train.grpo", *flags, "--out", str(tmp_path / "one")])
    _run(_torchrun(2) + ["-m", "train.grpo", *flags, "--out", str(tmp_path / "two")])
    rows = [[json.loads(x) for x in open(tmp_path / d / "metrics.jsonl")] for d in ("one", "two")]
    assert [r["step"] for r in rows[1]] == [1, 2]
    for k in ("reward_mean", "accuracy", "resp_len", "zero_var_frac"):
        assert rows[1][0][k] == pytest.approx(rows[0][0][k]), k
    for k in ("loss", "kl", "entropy"):
        assert rows[1][0][k] == pytest.approx(rows[0][0][k], rel=1e-4, abs=1e-6), k
    ckpt = tmp_path / "two" / "ckpt" / "step_000002"
    assert (ckpt / "trainer.pt").exists() and (ckpt / "config.json").exists()
    i = flags.index("--steps")  # resume under FSDP2 (full optimizer state scattered back to the shards)
    _run(_torchrun(2) + ["-m", "train.grpo", *flags[:i + 1], "3", *flags[i + 2:], "--out", str(tmp_path / "two")])
    assert [json.loads(x)["step"] for x in open(tmp_path / "two" / "metrics.jsonl")] == [1, 2, 3]
