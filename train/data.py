"""Problems for RL and evaluation: JSONL loaders, prompt building, and a resumable deterministic sampler.

Layouts (see ../shared/data/*/SOURCE.md): MATH-500 `problem`/`answer` (+ `subject`, `level`, `unique_id`);
AIME 2024 `problem`/`answer` (a string, sometimes zero-padded: kept as is, the reward compares it as a number);
AMC 2023 `problem`/`answer` (a float: 27.0 -> "27"); GSM8K `question`/`answer` (the text after `#### `, commas
removed); and a user's own JSONL with configurable problem/answer keys (default `problem`/`answer`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from .rewards import gold_str

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class Problem:
    problem: str
    answer: str
    id: str = ""
    meta: dict = field(default_factory=dict)  # subject, level (MATH-500) or anything else worth reporting


def gsm8k_final(answer_text: str) -> str:
    """'... #### 1,000' -> '1000'."""
    if "####" not in answer_text:
        raise ValueError(f"gsm8k answer without '####': {answer_text[-80:]!r}")
    return answer_text.rsplit("####", 1)[1].strip().replace(",", "")


def _record(d: dict, i: int, dataset: str, problem_key: str, answer_key: str) -> Problem:
    if dataset == "gsm8k":
        return Problem(d["question"], gsm8k_final(d["answer"]), str(i))
    if dataset == "math500":
        return Problem(d["problem"], gold_str(d["answer"]), d.get("unique_id", str(i)),
                       {"subject": d.get("subject"), "level": d.get("level")})
    if dataset in ("aime24", "amc23"):
        return Problem(d["problem"], gold_str(d["answer"]), str(d.get("id", i)))
    if problem_key not in d or answer_key not in d:
        raise KeyError(f"record {i} lacks {problem_key!r} or {answer_key!r} (keys: {sorted(d)}); "
                       "set problem_key= / answer_key=")
    return Problem(str(d[problem_key]), gold_str(d[answer_key]), str(d.get("id", i)))


DATASETS = ("math500", "aime24", "amc23", "gsm8k", "custom")


def load_problems(path: str, dataset: str = "custom", problem_key: str = "problem", answer_key: str = "answer",
                  limit: int | None = None) -> list[Problem]:
    """Read a JSONL file of problems (never downloads). `dataset` picks the field layout."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset: unknown {dataset!r} (known: {', '.join(DATASETS)})")
    out = []
    with open(path) as f:
        for i, line in enumerate(f):
            if line.strip():
                out.append(_record(json.loads(line), i, dataset, problem_key, answer_key))
            if limit is not None and len(out) >= limit:
                break
    return out


def build_prompt(problem: str, tokenizer=None, system: str | None = None) -> str:
    """The model's chat template when its tokenizer has one, else a plain prompt asking for \\boxed{}."""
    text = f"{problem}\n{INSTRUCTION}"
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    head = f"{system}\n\n" if system else ""
    return f"{head}Problem: {text}\nSolution:"


class ProblemSampler:
    """Endless batches of problems: a fresh seeded shuffle each epoch; `state_dict()` holds (epoch, position) so a
    resumed run continues with exactly the problems an uninterrupted run would have drawn."""

    def __init__(self, problems: list, seed: int = 0):
        if not problems:
            raise ValueError("problems: empty")
        self.problems, self.seed = problems, seed
        self.epoch, self.pos = 0, 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> list[int]:
        order = list(range(len(self.problems)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self, n: int) -> list:
        out = []
        while len(out) < n:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._perm(self.epoch)
            take = min(n - len(out), len(self._order) - self.pos)
            out += [self.problems[i] for i in self._order[self.pos : self.pos + take]]
            self.pos += take
        return out

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.seed, self.epoch, self.pos = s["seed"], s["epoch"], s["pos"]
        self._order = self._perm(self.epoch)
