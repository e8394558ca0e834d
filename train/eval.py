"""Evaluate a checkpoint on MATH-500, AIME 2024, AMC 2023 or GSM8K: generate with the engine, grade with the
verifier, report pass@1, pass@k and maj@k (per subject and level on MATH-500).

    python -m train.eval --model DIR --data ../shared/data/math500/test.jsonl --dataset math500 \
        [--prompt-style chat|qwen-math|deepseek-r1|few-shot|plain|raw|auto] [--n K] [--limit N] \
        [--temperature T] [--top-p P] [--max-tokens M] [--seed S] [--chat-template-kwargs JSON] \
        [--show-prompt] [--json OUT] [--records SAMPLES.jsonl]

Protocol (what makes numbers comparable and reproducible):
  - prompts: `train.data.prompt_ids`, the function training uses too; the styles are described in train/data.py
    (`qwen-math`: Qwen2.5-Math's system prompt; `deepseek-r1`: no system prompt, temperature 0.6 and top-p 0.95
    unless given; `few-shot` for base models: Minerva's 4-shot MATH prompt, or the 8-shot GSM8K chain of thought
    for --dataset gsm8k). `--show-prompt` prints the first prompt as the model receives it (decoded token ids).
  - sampling: temperature 0 (greedy) for n = 1 unless the style or --temperature says otherwise, else 0.6. Sample j
    of the problem on line i of the data file draws from its own random stream, seeded from (seed, i, j), so a
    problem's samples do not depend on batch order or on which other problems are in the run (--limit).
  - metrics: pass@1 is the mean reward over the n samples (`accuracy`, the same number); pass@k for k <= n is the
    unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k), averaged over problems; maj@n takes the most
    frequent final answer among the n samples (answers grouped by mathematical equivalence). Top-level JSON keys
    "pass@1", "pass@2", ..., "pass@n", "maj@n".
  - grading: train.rewards (the last \\boxed{}, else `#### x`, else "the answer is x"; math-verify equivalence).
    A sample without a final answer scores 0 with reason "no answer"; `unparsed_gold` counts problems whose gold
    math-verify cannot parse (those are compared as normalised strings).
Data is read from the given file, never downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from collections import Counter, defaultdict

from ._pkg import model_module
from .data import (
    DATASETS,
    FEWSHOT_SETS,
    PROMPT_STYLES,
    STYLE_SAMPLING,
    Problem,
    fewshot_for,
    load_problems,
    prompt_ids,
    resolve_style,
    style_stop,
)
from .rewards import VerifyPool, answers_equal, default_pool, gold_parses, grade_answers, grade_completions

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
    """records: one per problem with `rewards` (n floats), `voted_correct`, `meta` (and `reasons`, `gold_parsed`)
    -> the metrics dict (top-level pass@k for k in ks_for(n), maj@n, accuracy = pass@1)."""
    out: dict = {"num_problems": len(records), "n": n}
    if not records:
        return {**out, "accuracy": 0.0, "pass@1": 0.0}
    P = len(records)
    for k in ks_for(n):
        out[f"pass@{k}"] = sum(pass_at_k(n, int(sum(r["rewards"])), k) for r in records) / P
    out["accuracy"] = out["pass@1"]  # the mean over samples (pass_at_k(n, c, 1) = c / n)
    out[f"maj@{n}"] = sum(r["voted_correct"] for r in records) / P
    out["unparsed_gold"] = sum(r.get("gold_parsed") is False for r in records)
    out["reasons"] = dict(Counter(x for r in records for x in r.get("reasons", [])))
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


def problem_seed(seed: int, index: int) -> int:
    """The request seed of the problem on line `index`: a hash of (seed, index), so neighbouring problems draw
    unrelated streams (the engine derives sample j's stream from (this seed, j))."""
    digest = hashlib.sha256(f"dsmath-eval:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits


def prompt_sha256(ids: list[int]) -> str:
    """Fingerprint of a prompt as sent: sha256 of its token ids written as comma-separated decimals."""
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


def grade(problems: list[Problem], completions: list[list[str]], pool: VerifyPool | None = None) -> list[dict]:
    """completions[i]: the n samples of problem i -> one record per problem (answers, rewards, reasons, majority
    vote and whether it is right, whether math-verify parses the gold)."""
    flat = [c for cs in completions for c in cs]
    golds = [p.answer for p, cs in zip(problems, completions) for _ in cs]
    grades = grade_completions(flat, golds, pool=pool)
    parses = gold_parses([p.answer for p in problems], pool=pool)
    records, at = [], 0
    for p, cs, parsed in zip(problems, completions, parses):
        gs = grades[at : at + len(cs)]
        at += len(cs)
        answers = [g.answer for g in gs]
        if len(cs) > 1:
            voted = majority_vote(answers, lambda a, b: answers_equal(a, b, pool=pool))
            ok = grade_answers([voted], [p.answer], pool=pool)[0].reward if voted is not None else 0.0
        else:
            voted, ok = answers[0], gs[0].reward
        records.append({"id": p.id, "index": p.index, "gold": p.answer, "gold_parsed": parsed, "answers": answers,
                        "rewards": [g.reward for g in gs], "reasons": [g.reason for g in gs], "voted": voted,
                        "voted_correct": ok, "meta": p.meta})
    return records


def generate(llm, prompts: list[list[int]], problems: list[Problem], n: int, temperature: float, max_tokens: int,
             top_p: float = 1.0, seed: int = 0, stop: list[str] | None = None) -> list[list[str]]:
    """n samples per prompt, each problem's request seeded from (seed, its line index)."""
    SamplingParams = model_module("engine").SamplingParams

    params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=stop or None,
                             seed=problem_seed(seed, p.index if p.index is not None else i))
              for i, p in enumerate(problems)]
    outs = llm.generate(prompts, params)
    return [[o.text for o in r.outputs] for r in outs]


def print_report(m: dict) -> None:
    print(f"problems: {m['num_problems']}  samples each: {m['n']}  pass@1 (accuracy): {m['accuracy']:.4f}"
          f"  unparsed gold: {m.get('unparsed_gold', 0)}")
    if m["n"] > 1:
        ks = [k for k in ks_for(m["n"]) if k > 1]
        maj = f"maj@{m['n']}"
        print("  ".join(f"pass@{k}: {m[f'pass@{k}']:.4f}" for k in ks) + f"  {maj}: {m[maj]:.4f}")
    if m.get("reasons"):
        print("samples: " + "  ".join(f"{r}: {c}" for r, c in sorted(m["reasons"].items())))
    for key in ("per_subject", "per_level"):
        if key in m:
            print(f"\n{key[4:]:<26} {'n':>5} {'acc':>7}")
            for g, v in m[key].items():
                print(f"{g:<26} {v['num_problems']:>5} {v['accuracy']:>7.4f}")


def _kwargs_json(text: str) -> dict:
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--chat-template-kwargs: not JSON ({e})") from e
    if not isinstance(d, dict):
        raise argparse.ArgumentTypeError("--chat-template-kwargs: expected a JSON object, e.g. "
                                         "'{\"enable_thinking\": false}'")
    return d


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory (weights + tokenizer)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory's)")
    ap.add_argument("--data", required=True, help="JSONL file of problems")
    ap.add_argument("--dataset", required=True, choices=DATASETS)
    ap.add_argument("--problem-key", default="problem")
    ap.add_argument("--answer-key", default="answer")
    ap.add_argument("--limit", type=int, default=None, help="the first N problems of the file")
    ap.add_argument("--n", type=int, default=1, help="samples per problem")
    ap.add_argument("--temperature", type=float, default=None,
                    help="default: the prompt style's (deepseek-r1: 0.6), else 0 (greedy) for n=1 and 0.6 for n>1")
    ap.add_argument("--top-p", type=float, default=None, help="default: the prompt style's (deepseek-r1: 0.95), else 1")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-style", "--prompt", dest="prompt_style", default="auto", choices=PROMPT_STYLES,
                    help="auto: chat if the tokenizer has a chat template, else plain (see train/data.py)")
    ap.add_argument("--system", default=None, help="system prompt (chat and plain styles)")
    ap.add_argument("--chat-template-kwargs", type=_kwargs_json, default=None,
                    help="JSON object passed to apply_chat_template, e.g. '{\"enable_thinking\": false}'")
    ap.add_argument("--fewshot", default=None, choices=sorted(FEWSHOT_SETS),
                    help="exemplars of the few-shot style (default: gsm8k-cot for gsm8k, else minerva-math)")
    ap.add_argument("--show-prompt", action="store_true", help="print the first problem's prompt as sent")
    ap.add_argument("--dtype", default=None, choices=[None, "bfloat16", "float16", "float32"])
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--json", default=None, help="write metrics (and per-problem answers) here")
    ap.add_argument("--records", default=None,
                    help="write one JSON line per sample: problem_id, sample, prompt_sha256, completion, answer, "
                         "reward, reason")
    a = ap.parse_args(argv)
    if a.n < 1:
        ap.error("--n must be >= 1")
    if a.system is not None and a.prompt_style in ("qwen-math", "deepseek-r1", "few-shot", "raw"):
        ap.error(f"--system: the {a.prompt_style} style takes no system prompt (use chat or plain)")

    import torch

    LLM = model_module("engine").LLM

    problems = load_problems(a.data, a.dataset, a.problem_key, a.answer_key, a.limit)
    llm = LLM(a.model, dtype=getattr(torch, a.dtype) if a.dtype else None, max_num_seqs=max(a.max_num_seqs, a.n),
              tokenizer=a.tokenizer)
    if llm.tokenizer is None:
        raise ValueError("--tokenizer: the checkpoint has no tokenizer; pass --tokenizer DIR")
    style = resolve_style(a.prompt_style, llm.tokenizer)
    fewshot = a.fewshot or fewshot_for(a.dataset)
    defaults = STYLE_SAMPLING.get(style, {})
    temp = a.temperature if a.temperature is not None else defaults.get("temperature", 0.0 if a.n == 1 else 0.6)
    top_p = a.top_p if a.top_p is not None else defaults.get("top_p", 1.0)
    prompts = [prompt_ids(p.problem, llm.tokenizer, style, a.system, a.chat_template_kwargs, fewshot=fewshot)
               for p in problems]
    if a.show_prompt and prompts:
        print(f"prompt style: {style}" + (f" ({a.prompt_style})" if style != a.prompt_style else "")
              + f"; first prompt, {len(prompts[0])} tokens:")
        print(llm.tokenizer.decode(prompts[0], skip_special_tokens=False))
        print("-" * 80)
    t0 = time.time()
    completions = generate(llm, prompts, problems, a.n, temp, a.max_tokens, top_p, a.seed,
                           style_stop(style, fewshot))
    t1 = time.time()
    records = grade(problems, completions, default_pool())
    m = summarize(records, a.n)
    m.update({"dataset": a.dataset, "model": a.model, "prompt_style": style, "temperature": temp, "top_p": top_p,
              "max_tokens": a.max_tokens, "seed": a.seed, "chat_template_kwargs": a.chat_template_kwargs,
              "generate_s": round(t1 - t0, 2), "grade_s": round(time.time() - t1, 2)})
    if style == "few-shot":
        m["fewshot"] = fewshot
    print_report(m)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**m, "problems": records}, f, indent=1)
    if a.records:
        with open(a.records, "w") as f:
            for p, ids, cs, r in zip(problems, prompts, completions, records):
                sha = prompt_sha256(ids)
                for j, c in enumerate(cs):
                    f.write(json.dumps({"problem_id": p.id, "sample": j, "prompt_sha256": sha, "completion": c,
                                        "answer": r["answers"][j], "reward": r["rewards"][j],
                                        "reason": r["reasons"][j]}) + "\n")
    return m


if __name__ == "__main__":
    main()
