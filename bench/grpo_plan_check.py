"""The first GPU run tests the memory plan: a V2-Lite-shaped GRPO run (DeepSeek-V2-Lite's widths, vocabulary and
experts, fewer layers, random weights) under `torchrun --nproc-per-node 1` (FSDP2, NCCL, bf16 mixed precision,
CUDA graphs in the distributed rollout, sleep/wake_up, mem_get_info KV budget), compared with what
`python -m train.grpo --plan-memory` predicts for the same flags.

    python bench/grpo_plan_check.py [--layers 2] [--steps 2] [--rollout-offload]

Checks: the run finishes, losses are finite, the rollout captured CUDA graphs, and the measured peak
(`peak_mem_gib`: torch.cuda.max_memory_allocated over a step) lies within [0.85, 1.10] of the plan's allocated peak;
also that the plan's static state (master + AdamW + reference) is what the load left allocated. Prints a table, then
one JSON line; exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import print_json, print_table  # noqa: E402


def flags(model: str, layers: int, steps: int, out: str, offload: bool) -> list[str]:
    f = ["--config", "toy", "--model", model, "--model-overrides", json.dumps({"num_hidden_layers": layers}),
         "--init-std", "0.02", "--tokenizer", "char", "--data", "toy", "--warmstart-steps", "0",
         "--problems-per-step", "4", "--group-size", "8", "--max-tokens", "32", "--micro-batch", "8",
         "--threads", "none", "--engine-block-size", "64", "--engine-max-num-seqs", "16", "--beta", "0.04",
         "--steps", str(steps + 1), "--stop-after", str(steps), "--save-every", "0", "--out", out]
    if offload:
        f += ["--rollout-offload", "true", "--ref-offload", "true"]
    return f


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (V2-Lite has 27: 1 dense + 26 MoE)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rollout-offload", action="store_true", help="also offload training state and reference")
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--model", default="v2-lite", help="a preset (tiny: a CPU smoke test of this script)")
    a = ap.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "python"), ROOT,
                                                         os.environ.get("PYTHONPATH", "")])}
    out = tempfile.mkdtemp(prefix="grpo_plan_")
    f = flags(a.model, a.layers, a.steps, out, a.rollout_offload)
    plan_json = os.path.join(out, "plan.json")
    r = subprocess.run([sys.executable, "-m", "train.grpo", "--plan-memory", "--world-size", "1",
                        "--plan-prompt-tokens", "8", "--plan-json", plan_json, *f],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    print("\n".join(r.stdout.strip().splitlines()[:-1]) if r.returncode == 0 else r.stderr[-3000:])
    if r.returncode != 0:
        return 1
    plan = json.load(open(plan_json))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                        "-m", "train.grpo", *f], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=a.timeout)
    wall = time.time() - t0
    if r.returncode != 0:
        print(r.stdout[-3000:], r.stderr[-6000:])
        return 1
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    measured = max(m["peak_mem_gib"] for m in rows)
    static = plan["update"]["policy master weights (fp32 shards)"] + plan["update"]["AdamW moments (fp32 shards)"] \
        + plan["update"]["reference (shards)"]
    ratio = measured / plan["peak_allocated_gib"]
    checks = {"finished": len(rows) == a.steps, "finite": all(math.isfinite(m["loss"]) for m in rows),
              "cuda_graphs": all(m["rollout_cuda_graphs"] > 0 for m in rows), "peak_within_plan": 0.85 <= ratio <= 1.10}
    table = [{"what": "step peak allocated (GiB)", "planned": plan["peak_allocated_gib"], "measured": measured,
              "ratio": ratio},
             {"what": "rollout phase (GiB)", "planned": plan["rollout_gib"], "measured": None, "ratio": None},
             {"what": "update phase (GiB)", "planned": plan["update_gib"], "measured": None, "ratio": None},
             {"what": "load peak vs static state (GiB)", "planned": static, "measured": rows[0]["load_peak_mem_gib"],
              "ratio": rows[0]["load_peak_mem_gib"] / static}]
    print(f"V2-Lite-shaped GRPO, {a.layers} layers, {plan['params_b']:.2f} B parameters, 1 rank (FSDP2 + NCCL), "
          f"rollout_offload={a.rollout_offload}: {wall:.0f} s")
    print_table(table, [("what", "", "s"), ("planned", "plan", ".2f"), ("measured", "measured", ".2f"),
                        ("ratio", "ratio", ".3f")])
    print("checks:", " ".join(f"{k}={'ok' if v else 'FAIL'}" for k, v in checks.items()))
    print_json({"bench": "grpo_plan_check", "layers": a.layers, "offload": a.rollout_offload, "plan": plan,
                "peak_mem_gib": measured, "ratio": ratio, "metrics": rows, "checks": checks, "wall_s": wall})
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
