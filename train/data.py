"""Problems for RL and evaluation: JSONL loaders, prompts (token ids), and a resumable deterministic sampler.

Layouts (see ../shared/data/*/SOURCE.md): MATH-500 `problem`/`answer` (+ `subject`, `level`, `unique_id`);
AIME 2024 `problem`/`answer` (a string, sometimes zero-padded: kept as is, the reward compares it as a number);
AMC 2023 `problem`/`answer` (a float: 27.0 -> "27"); GSM8K `question`/`answer` (the text after `#### `, commas
removed); and a user's own JSONL with configurable problem/answer keys (default `problem`/`answer`).

Prompts: `prompt_ids(problem, tokenizer, style)` is the one function that turns a problem into the token ids the
model sees, for training and evaluation alike. Chat styles render the tokenizer's chat template and encode it with
`add_special_tokens=False` (what `apply_chat_template(tokenize=True)` does): templates that begin with
`{{ bos_token }}` (DeepSeek-V2/V3/R1) put their one BOS there, and encoding the rendered text with special tokens
would add a second. Text styles (`plain`, `raw`, `few-shot`) are encoded once with the tokenizer's own special
tokens (one BOS where the tokenizer adds one). Styles:
  - `chat`: the instruction after the problem in the user turn (an optional system turn);
  - `qwen-math`: Qwen2.5-Math's evaluation prompt, the instruction as the system turn, the problem as the user's;
  - `deepseek-r1`: DeepSeek-R1's recommendation, no system prompt, the instruction in the user turn (sampled at
    temperature 0.6, top-p 0.95: `STYLE_SAMPLING`);
  - `few-shot`: for base models, worked exemplars then the problem (Minerva's 4-shot prompt for MATH, the 8-shot
    chain of thought of Wei et al. for GSM8K; `train/prompts/*.json`, each naming its source);
  - `plain`: "Problem: ... <instruction>\nSolution:" without a template; `raw`: the problem text as is (toy task);
  - `auto`: `chat` when the tokenizer has a chat template, else `plain` (`resolve_style` says which).
"""

from __future__ import annotations

import functools
import json
import os
import random
from dataclasses import dataclass, field

from .rewards import gold_str

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PROMPT_STYLES = ("auto", "chat", "qwen-math", "deepseek-r1", "few-shot", "plain", "raw")
CHAT_STYLES = ("chat", "qwen-math", "deepseek-r1")
STYLE_SAMPLING = {"deepseek-r1": {"temperature": 0.6, "top_p": 0.95}}  # defaults a style recommends
FEWSHOT_SETS = {"minerva-math": "minerva_math_4shot.json", "gsm8k-cot": "gsm8k_cot_8shot.json"}
_PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")


@dataclass
class Problem:
    problem: str
    answer: str
    id: str = ""
    meta: dict = field(default_factory=dict)  # subject, level (MATH-500) or anything else worth reporting
    index: int | None = None  # line number in its file: evaluation seeds derive from it, whatever else is run


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
    return Problem(str(d[problem_key]), gold_str(d[answer_key], f"record {i} {answer_key!r}"), str(d.get("id", i)))


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
                out[-1].index = i
            if limit is not None and len(out) >= limit:
                break
    return out


def fewshot_for(dataset: str) -> str:
    """The few-shot set for a data set: GSM8K's chain of thought for gsm8k, Minerva's MATH prompt otherwise."""
    return "gsm8k-cot" if dataset == "gsm8k" else "minerva-math"


@functools.cache
def fewshot_set(name: str) -> dict:
    """A few-shot set from train/prompts: format, query, separator, stop strings, exemplars, source."""
    if name not in FEWSHOT_SETS:
        raise ValueError(f"fewshot: unknown set {name!r} (known: {', '.join(FEWSHOT_SETS)})")
    with open(os.path.join(_PROMPTS_DIR, FEWSHOT_SETS[name]), encoding="utf-8") as f:
        return json.load(f)


def resolve_style(style: str, tokenizer) -> str:
    """`auto` -> `chat` when the tokenizer has a chat template, else `plain`; other styles as they are."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"style: unknown prompt style {style!r} (known: {', '.join(PROMPT_STYLES)})")
    if style == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    return style


def prompt_messages(problem: str, style: str, system: str | None = None) -> list[dict]:
    """The chat turns of a chat style."""
    if style == "qwen-math":
        return [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": problem}]
    user = [{"role": "user", "content": f"{problem}\n{INSTRUCTION}"}]
    return ([{"role": "system", "content": system}] if system and style == "chat" else []) + user


def prompt_text(problem: str, style: str, system: str | None = None, fewshot: str = "minerva-math") -> str:
    """The text of a text style (plain, raw, few-shot)."""
    if style == "raw":
        return problem
    if style == "plain":
        head = f"{system}\n\n" if system else ""
        return f"{head}Problem: {problem}\n{INSTRUCTION}\nSolution:"
    if style == "few-shot":
        fs = fewshot_set(fewshot)
        shots = [fs["format"].format(**ex) for ex in fs["exemplars"]]
        return fs["separator"].join(shots + [fs["query"].format(problem=problem)])
    raise ValueError(f"style: {style!r} is not a text style (plain, raw, few-shot)")


def prompt_ids(problem: str, tokenizer, style: str = "chat", system: str | None = None,
               chat_template_kwargs: dict | None = None, *, fewshot: str = "minerva-math") -> list[int]:
    """The token ids of `problem` as the model sees it in `style` (see the module docstring): exactly one BOS where
    the template or the tokenizer puts one, never two. `chat_template_kwargs` go to `apply_chat_template`
    (e.g. `{"enable_thinking": False}`); `fewshot` names the exemplar set of the few-shot style."""
    if not isinstance(problem, str):
        raise TypeError(f"problem: expected str, got {type(problem).__name__}")
    style = resolve_style(style, tokenizer)
    if system is not None and style in ("qwen-math", "deepseek-r1", "few-shot", "raw"):
        raise ValueError(f"system: the {style} style has no system prompt of yours (qwen-math sets its own; "
                         "deepseek-r1 uses none, as DeepSeek recommends); use the chat or plain style")
    if style in CHAT_STYLES:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"style: {style!r} needs a tokenizer with a chat template (this one has none); "
                             "use plain or few-shot for a base model")
        text = tokenizer.apply_chat_template(prompt_messages(problem, style, system), tokenize=False,
                                             add_generation_prompt=True, **(chat_template_kwargs or {}))
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if chat_template_kwargs:
        raise ValueError(f"chat_template_kwargs: the {style} style uses no chat template")
    return list(tokenizer(prompt_text(problem, style, system, fewshot))["input_ids"])


def style_stop(style: str, fewshot: str = "minerva-math") -> list[str]:
    """Stop strings a style needs: a base model continues a few-shot prompt with the next "Problem:" / "Q:"."""
    return list(fewshot_set(fewshot)["stop"]) if style == "few-shot" else []


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
