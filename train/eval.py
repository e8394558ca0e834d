"""Evaluate a checkpoint on MATH-500, AIME 2024, AMC 2023 or GSM8K: generate with the engine, grade with
`math_reward`, report pass@1 (and maj@k, pass@k when sampling n > 1), per subject and level on MATH-500.

    python -m train.eval --model DIR --data ../shared/data/math500/test.jsonl --dataset math500 \
        [--limit N] [--n K] [--temperature T] [--max-tokens M] [--json OUT]

Prompts use the model's chat template when its tokenizer has one, else a plain prompt asking for \\boxed{}.
pass@k is the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k), averaged over problems;
maj@k takes the most frequent final answer among k samples, answers grouped by mathematical equivalence.
Data is read from the given file, never downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict

from ._pkg import model_module
from .data import DATASETS, Problem, build_prompt, load_problems
from .rewards import VerifyPool, answers_equal, default_pool, extract_answer, math_reward, math_rewards

# ---------------------------------------------------------------------------------------------------------------
# Pure metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))  # C(n-c, k) / C(n, k) as a stable product


def majority_vote(answers: list[str | None], equal=None) -> str | None:
    """Most frequent answer, answers grouped by `equal(a, b)` (default: mathematical equivalence). None (no answer)
    never wins; ties go to the answer seen first."""
    equal = equal or answers_equal
    reps: list[str] = []
    counts: list[int] = []
    for a in answers:
        if a is None:
            continue
        for i, r in enumerate(reps):
            if a == r or equal(a, r):
                counts[i] += 1
                break
        else:
            reps.append(a)
            counts.append(1)
    if not reps:
        return None
    return reps[max(range(len(reps)), key=lambda i: (counts[i], -i))]


def ks_for(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks = [k for k in (2**i for i in range(int(math.log2(n)) + 1)) if k <= n]
    return ks if ks[-1] == n else ks + [n]


def summarize(records: list[dict], n: int) -> dict:
    """records: one per problem with `rewards` (n floats), `voted_correct` and `meta` -> the metrics dict."""
    out = {"num_problems": len(records), "n": n}
    if not records:
        return {**out, "accuracy": 0.0}
    out["accuracy"] = sum(sum(r["rewards"]) / n for r in records) / len(records)  # pass@1 (mean over samples)
    if n > 1:
        out["pass@k"] = {str(k): sum(pass_at_k(n, int(sum(r["rewards"])), k) for r in records) / len(records)
                         for k in ks_for(n)}
        out[f"maj@{n}"] = sum(r["voted_correct"] for r in records) / len(records)
    for key in ("subject", "level"):
        groups = defaultdict(list)
        for r in records:
            if r["meta"].get(key) is not None:
                groups[str(r["meta"][key])].append(sum(r["rewards"]) / n)
        if groups:
            out[f"per_{key}"] = {g: {"accuracy": sum(v) / len(v), "num_problems": len(v)}
                                 for g, v in sorted(groups.items())}
    return out


# ---------------------------------------------------------------------------------------------------------------
# Generation and grading


def grade(problems: list[Problem], completions: list[list[str]], pool: VerifyPool | None = None) -> list[dict]:
    """completions[i]: the n samples of problem i -> one record per problem (rewards, answers, majority vote)."""
    flat = [c for cs in completions for c in cs]
    golds = [p.answer for p, cs in zip(problems, completions) for _ in cs]
    rewards = math_rewards(flat, golds, pool=pool)
    records, at = [], 0
    for p, cs in zip(problems, completions):
        rs = rewards[at : at + len(cs)]
        at += len(cs)
        answers = [extract_answer(c) for c in cs]
        voted = majority_vote(answers, lambda a, b: answers_equal(a, b, pool=pool)) if len(cs) > 1 else answers[0]
        ok = rs[0] if len(cs) == 1 else (math_reward(f"\\boxed{{{voted}}}", p.answer, pool=pool) if voted else 0.0)
        records.append({"id": p.id, "gold": p.answer, "answers": answers, "rewards": rs, "voted": voted,
                        "voted_correct": ok, "meta": p.meta})
    return records


def make_prompt(problem: str, tokenizer, style: str = "auto", system: str | None = None) -> str:
    """auto: chat template if the tokenizer has one, else plain; plain: the \\boxed{} prompt; raw: as is."""
    if style == "raw":
        return problem
    return build_prompt(problem, tokenizer if style == "auto" else None, system)


def generate(llm, problems: list[Problem], n: int, temperature: float, max_tokens: int, top_p: float = 1.0,
             seed: int = 0, system: str | None = None, style: str = "auto") -> list[list[str]]:
    SamplingParams = model_module("engine").SamplingParams

    prompts = [make_prompt(p.problem, llm.tokenizer, style, system) for p in problems]
    params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    outs = llm.generate(prompts, params)
    return [[o.text for o in r.outputs] for r in outs]


def print_report(m: dict) -> None:
    print(f"problems: {m['num_problems']}  samples each: {m['n']}  accuracy (pass@1): {m['accuracy']:.4f}")
    if "pass@k" in m:
        maj = f"maj@{m['n']}"
        print("  ".join(f"pass@{k}: {v:.4f}" for k, v in m["pass@k"].items()) + f"  {maj}: {m[maj]:.4f}")
    for key in ("per_subject", "per_level"):
        if key in m:
            print(f"\n{key[4:]:<26} {'n':>5} {'acc':>7}")
            for g, v in m[key].items():
                print(f"{g:<26} {v['num_problems']:>5} {v['accuracy']:>7.4f}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory (weights + tokenizer)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory's)")
    ap.add_argument("--data", required=True, help="JSONL file of problems")
    ap.add_argument("--dataset", required=True, choices=DATASETS)
    ap.add_argument("--problem-key", default="problem")
    ap.add_argument("--answer-key", default="answer")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--n", type=int, default=1, help="samples per problem")
    ap.add_argument("--temperature", type=float, default=None, help="default 0 (greedy) for n=1, else 0.6")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--system", default=None, help="system prompt (chat template only)")
    ap.add_argument("--prompt", default="auto", choices=["auto", "plain", "raw"],
                    help="auto: chat template if any, else plain; raw: the problem text as is (toy runs)")
    ap.add_argument("--dtype", default=None, choices=[None, "bfloat16", "float16", "float32"])
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--json", default=None, help="write metrics (and per-problem answers) here")
    a = ap.parse_args(argv)

    import torch

    LLM = model_module("engine").LLM

    problems = load_problems(a.data, a.dataset, a.problem_key, a.answer_key, a.limit)
    temp = a.temperature if a.temperature is not None else (0.0 if a.n == 1 else 0.6)
    llm = LLM(a.model, dtype=getattr(torch, a.dtype) if a.dtype else None, max_num_seqs=max(a.max_num_seqs, a.n),
              tokenizer=a.tokenizer)
    t0 = time.time()
    completions = generate(llm, problems, a.n, temp, a.max_tokens, a.top_p, a.seed, a.system, a.prompt)
    t1 = time.time()
    records = grade(problems, completions, default_pool())
    m = summarize(records, a.n)
    m.update({"dataset": a.dataset, "model": a.model, "temperature": temp, "max_tokens": a.max_tokens,
              "generate_s": round(t1 - t0, 2), "grade_s": round(time.time() - t1, 2)})
    print_report(m)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**m, "problems": records}, f, indent=1)
    return m


if __name__ == "__main__":
    main()
