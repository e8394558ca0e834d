"""Draw a GRPO run's curves: `python -m train.plot OUT` reads OUT/metrics.jsonl and writes OUT/curves.png
(reward mean +- std and accuracy, KL, mean response length, entropy and clip fraction), smoothed over a window."""

from __future__ import annotations

import argparse
import json
import os


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def smooth(xs: list[float], window: int) -> list[float]:
    """Trailing moving average (window 1: the raw values)."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= window:
            acc -= xs[i - window]
        out.append(acc / min(i + 1, window))
    return out


PANELS = [("reward", ["reward_mean", "accuracy"]), ("KL to reference", ["kl"]), ("response length", ["resp_len"]),
          ("entropy / clip fraction", ["entropy", "clip"])]


def plot(out_dir: str, window: int = 5, path: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for ax, (title, keys) in zip(axes, PANELS):
        for k in keys:
            ys = [r.get(k, float("nan")) for r in rows]
            ax.plot(steps, ys, alpha=0.25, lw=0.8)
            ax.plot(steps, smooth(ys, window), label=k, lw=1.6, color=ax.lines[-1].get_color())
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = path or os.path.join(out_dir, "curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", help="run directory holding metrics.jsonl")
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--png", default=None, help="output path (default OUT/curves.png)")
    a = ap.parse_args(argv)
    print(plot(a.out, a.window, a.png))


if __name__ == "__main__":
    main()
