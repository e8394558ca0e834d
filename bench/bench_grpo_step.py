"""GRPO step bench (issue 14): the toy run (`--config toy`: tiny MoE, 16 problems x 8 samples, fp32) timed with and
without the skipped old-log-prob recompute, and the sampler-trainer agreement figures — logprob_gap (mean / max
|engine - trainer| over completion tokens) and router_agreement — with and without routing replay, fp32 and bf16.

Each variant runs the same seeded steps from the same warm start (same samples while the updates agree); the
variants run in turn `--repeat` times (interleaved, so load on a shared machine hits them alike) after one
discarded warm-up run; times are medians over all steps after each run's first (step_s = generation + scoring +
the training part; train_s = the training part: old / reference log-probs and the policy update; logprob_s = the
old / reference forwards alone; *_cpu_s: the same in process CPU seconds, less sensitive to a loaded machine).
Usage: python bench/bench_grpo_step.py [--steps 12] [--repeat 3] [--beta 0.04] [--quick]"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
from _util import device_name, print_json, print_table  # noqa: E402

from train.config import parse_config  # noqa: E402
from train.grpo import run  # noqa: E402

VARIANTS = {  # name: flags
    "fp32 replay, recompute skipped": [],
    "fp32 replay, recomputed": ["--skip-recompute", "false"],
    "fp32 no replay": ["--routing-replay", "false"],
    "bf16 replay": ["--dtype", "bfloat16"],
    "bf16 no replay": ["--dtype", "bfloat16", "--routing-replay", "false"],
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--beta", type=float, default=0.04, help="0 also drops the reference forward")
    ap.add_argument("--quick", action="store_true", help="3 steps, fp32 variants only (smoke run)")
    ap.add_argument("--variants", default=None, help="subset of the variant names, separated by ';'")
    a = ap.parse_args(argv)
    steps, repeat = (3, 1) if a.quick else (a.steps, a.repeat)
    names = list(VARIANTS)[:3] if a.quick else list(VARIANTS)
    if a.variants:
        names = [n for n in names if n in a.variants.split(";")]
    hists = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        def once(name, n_steps, tag):
            cfg = parse_config(["--config", "toy", "--out", os.path.join(tmp, tag), "--steps", str(n_steps),
                                "--save-every", "0", "--beta", str(a.beta), *VARIANTS[name]])
            return run(cfg)

        once(names[0], 1, "warmup")
        for r in range(repeat):
            for i, name in enumerate(names):
                hists[name].append(once(name, steps, f"{r}-{i}"))
    rows = []
    for name, runs in hists.items():
        later = [m for hist in runs for m in (hist[1:] or hist)]
        every = [m for hist in runs for m in hist]
        med = {k: statistics.median(m[k] for m in later)
               for k in ("step_s", "train_s", "logprob_s", "train_cpu_s", "logprob_cpu_s")}
        rows.append({"variant": name, **med, "skipped": all(m["recompute_skipped"] for m in every),
                     "gap_mean": statistics.mean(m["logprob_gap"] for m in every),
                     "gap_max": max(m["logprob_gap_max"] for m in every),
                     "agreement_mean": statistics.mean(m["router_agreement"] for m in every),
                     "agreement_min": min(m["router_agreement"] for m in every),
                     "reward_last": runs[-1][-1]["reward_mean"]})
    print(f"GRPO toy step, {repeat} x {steps} steps per variant, beta {a.beta}, {device_name(torch.device('cpu'))}")
    print_table(rows, [("variant", "variant", "s"), ("step_s", "step s", ".3f"), ("train_s", "train s", ".3f"),
                       ("train_cpu_s", "train cpu s", ".3f"), ("logprob_s", "old+ref fwd s", ".3f"),
                       ("logprob_cpu_s", "old+ref cpu s", ".3f"), ("gap_mean", "gap mean", ".2e"),
                       ("gap_max", "gap max", ".2e"), ("agreement_mean", "router agr mean", ".4f"),
                       ("agreement_min", "min", ".4f")])
    out = {"bench": "grpo_step", "steps": steps, "repeat": repeat, "beta": a.beta, "rows": rows}
    print_json(out)
    return out


if __name__ == "__main__":
    main()
