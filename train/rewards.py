"""Verifiable rewards for math RL: is the completion's final answer equal to the gold answer?

`math_reward(completion, gold)` returns 1.0 or 0.0; `grade_completions` returns a `Grade` per completion (reward,
extracted answer, reason). The final answer is the LAST `\\boxed{...}` (or `\\fbox`, `\\framebox`, `\\boxed 5`) of
the completion; without one, the last `#### x` line (GSM8K); else the last "the answer is x" (few-shot CoT,
Minerva's "The final answer is $x$. I hope it is correct."). Extraction is ours, in one linear pass
(math-verify would take the FIRST box); math-verify gets only the extracted answer.

Equivalence is math-verify's (sympy underneath), run in `_verify_worker.py` processes: the whole check, our few
additions to its normalisation included (see that file), runs under a hard deadline; a worker past it is killed
and replaced and the check scores 0.0 with reason "timeout", so a pathological expression never stalls training.
In this process only two exact decisions are taken without sympy, both as math-verify would take them: identical
answers, and two plain numbers (`18`, `-3.50`, `025`, `1,000`, `7/2`) that are equal, or are two different
integers. That covers GSM8K, AIME and AMC without a worker round trip.

Bounded whatever the text: extraction is linear (no backtracking patterns, one pass over the braces), answers
longer than `MAX_ANSWER_CHARS` score 0 ("answer too long"), everything else waits at most the pool's deadline.

Batch API: `math_rewards(completions, golds)` scores many completions in parallel over the pool (identical
(answer, gold) pairs are checked once). Optional shaping terms, kept separate so the trainer can weight them:
`format_reward`, `length_penalty`.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing.connection import wait
from typing import NamedTuple

import numpy as np

MAX_ANSWER_CHARS = 4096  # a longer "final answer" is not one (and would only burn the worker's deadline)

# ----------------------------------------------------------------------------------------------------------------
# Extracting the final answer (linear time)

_TOKEN_RE = re.compile(r"[^\s$]+")
_SPACE_CODES = np.array([c for c in range(0x3001) if chr(c).isspace()], dtype=np.uint32)  # what str.strip() strips
_HASH_RE = re.compile(r"^[ \t]*####", re.MULTILINE)
_ANSWER_IS_RE = re.compile(r"answer\s+is\b\s*[:：]?", re.IGNORECASE)


def _next_at(mask: np.ndarray) -> np.ndarray:
    """[n + 1] int32: for each i the first index >= i where mask holds (n where none; index n gives n)."""
    n = mask.size
    out = np.full(n + 1, n, dtype=np.int32)
    out[:n] = np.where(mask, np.arange(n, dtype=np.int32), n)
    return np.minimum.accumulate(out[::-1])[::-1]


def _box_commands(a: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Starts and ends (int32, ascending) of `\\boxed`, `\\fbox`, `\\framebox` not followed by a letter, in the
    code points `a` ([n] text + at least 9 zeros)."""
    bs = np.flatnonzero(a[:n] == 92).astype(np.int32)
    starts, ends = [], []
    for word in ("boxed", "fbox", "framebox"):
        hit = np.ones(bs.size, dtype=bool)
        for j, ch in enumerate(word, 1):
            hit &= a[bs + j] == ord(ch)
        nxt = a[bs + len(word) + 1] | 32  # lower-cased: a letter lies in a..z
        hit &= (nxt < 97) | (nxt > 122)
        starts.append(bs[hit])
        ends.append(bs[hit] + len(word) + 1)
    order = np.argsort(np.concatenate(starts), kind="stable")
    return np.concatenate(starts)[order], np.concatenate(ends)[order]


def last_boxed(text: str) -> str | None:
    """Content of the last non-empty, well-formed \\boxed{...} / \\fbox{...} / \\framebox{...} (or `\\boxed 5`), by
    the position of its command; None if there is none.

    Linear and vectorised (a policy under RL writes megabytes of braces): the brace depth is a running sum over the
    unescaped braces (a '}' with nothing open is ignored); its suffix minimum tells in O(1) whether a box's brace
    ever closes, and only the winner's closing brace is searched for."""
    if "box" not in text:
        return None
    a = np.zeros(len(text) + 10, dtype=np.uint32)  # code points, then zeros (no letter, no brace) to look past
    n = len(text)
    a[:n] = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    c, ends = _box_commands(a, n)
    if not c.size:
        return None
    other = np.where(a[:n] == 92, -1, np.arange(n, dtype=np.int32))
    np.maximum.accumulate(other, out=other)  # last non-backslash at or before i
    escaped = np.zeros(n + 1, dtype=bool)  # after an odd run of backslashes (index n: past the end)
    escaped[1:n] = (np.arange(n - 1, dtype=np.int32) - other[:-1]) & 1
    depth = (a[:n] == 123).astype(np.int32)
    depth -= a[:n] == 125
    depth[escaped[:n]] = 0
    np.cumsum(depth, out=depth)
    depth -= np.minimum(np.minimum.accumulate(depth), 0)  # [n] open braces after i (stray '}' ignored)
    suffix_min = np.full(n + 1, np.iinfo(np.int32).max, dtype=np.int32)
    suffix_min[:n] = np.minimum.accumulate(depth[::-1])[::-1]
    after_ws = _next_at(~np.isin(a[:n], _SPACE_CODES))  # first non-whitespace at or after i
    depth = np.append(depth, 0)  # index n (past the end): no brace in `a`, depth 0
    o = after_ws[ends]  # the first non-whitespace after the command: '{' of a box, or a `\boxed 5` token
    live = ~escaped[c] & (o < n)  # a backslash after an odd run is `\\` + text, no command
    brace = live & (a[o] == 123)
    d = depth[o]
    q = after_ws[np.minimum(o + 1, n)]  # the first non-whitespace inside: the box is empty if it closes there
    empty = (a[q] == 125) & ~escaped[q]
    boxes = np.flatnonzero(brace & (suffix_min[np.minimum(o + 1, n)] < d) & ~empty)  # closed and not empty
    tokens = np.flatnonzero(live & ~brace & (o > ends))  # `\boxed 5`: the token after the whitespace
    last = int(boxes[-1]) if boxes.size else -1
    for i in tokens[tokens > last][::-1].tolist():  # a token may be empty ('$...', '.'); tokens are disjoint
        t = _TOKEN_RE.match(text, int(o[i]))
        if t and t.group().rstrip(".,"):
            return t.group().rstrip(".,")
    if last < 0:
        return None
    start = int(o[last]) + 1
    end = start + int(np.argmax(depth[start:] < d[last]))  # its closing brace
    return text[start:end].strip()


def _last_hash_line(text: str) -> str | None:
    """The answer on the last non-empty `#### x` line (GSM8K's format)."""
    ans = None
    for m in _HASH_RE.finditer(text):
        end = text.find("\n", m.end())
        line = text[m.end() : end if end >= 0 else len(text)].strip()
        if line:
            ans = line
    return ans


def _answer_is(text: str) -> str | None:
    """'... the answer is x.' in the last 2,000 characters: the last occurrence; `$x$` if the answer opens a math
    span, else up to the end of its sentence (". ") or line; Minerva's "I hope it is correct." dropped."""
    tail = text[-2000:]
    last = None
    for last in _ANSWER_IS_RE.finditer(tail):  # noqa: B007 - we want the last match
        pass
    if last is None:
        return None
    rest = tail[last.end() :].lstrip()
    if rest.startswith("$"):
        rest = rest.lstrip("$")
        end = rest.find("$")
        ans = rest[:end] if end >= 0 else rest.split("\n", 1)[0]
    else:
        ans = rest.split("\n", 1)[0]
        for stop in ("I hope it is correct", ". "):
            cut = ans.find(stop)
            if cut >= 0:
                ans = ans[:cut]
    ans = ans[:200].strip().rstrip(".").strip().strip("$").strip()
    return ans or None


def extract_answer(text: str) -> str | None:
    """The completion's final answer as a string: last box, else last `#### x` line, else 'the answer is x'."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected str, got {type(text).__name__}")
    if not text:
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    hashed = _last_hash_line(text)
    if hashed is not None:
        return hashed
    return _answer_is(text)


# ----------------------------------------------------------------------------------------------------------------
# Gold answers and the exact in-process decisions

_PLAIN_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+|\d+/\d+|[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?)")


def gold_str(gold, name: str = "gold") -> str:
    """A gold answer as a string. Strings pass as they are (stripped); ints and finite floats are accepted as
    numbers (AMC stores 27.0: integral floats become '27'); anything else (None, bytes, bool, lists) is a
    TypeError naming `name`."""
    if isinstance(gold, str):
        return gold.strip()
    if isinstance(gold, bool) or not isinstance(gold, (int, float)):
        raise TypeError(f"{name}: expected a str (or int/float) gold answer, got {type(gold).__name__}")
    if isinstance(gold, float):
        if not math.isfinite(gold):
            raise TypeError(f"{name}: a gold answer must be finite, got {gold!r}")
        return str(int(gold)) if gold.is_integer() else repr(gold)
    return str(gold)


def plain_number(s: str) -> Fraction | None:
    """Exact value of a plain number ('025', '-3.50', '7/2', '1,000'); None if `s` is anything else."""
    s = s.strip()
    if len(s) > 40 or not _PLAIN_NUMBER_RE.fullmatch(s):
        return None
    try:
        return Fraction(s.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def _quick(pred: str, gold: str) -> bool | None:
    """Decide without sympy where math-verify's answer is certain: identical answers, equal plain numbers, two
    different integers. None: ask the pool."""
    p, g = pred.strip(), gold.strip()
    if p == g and p:
        return True
    pn, gn = plain_number(p), plain_number(g)
    if pn is None or gn is None:
        return None
    if pn == gn:
        return True
    if pn.denominator == 1 and gn.denominator == 1 and not any(c in p + g for c in "./"):
        return False  # integers: math-verify compares them exactly too
    return None  # decimals: math-verify's rounding decides


# ----------------------------------------------------------------------------------------------------------------
# math-verify in worker processes with a hard deadline

_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_verify_worker.py")


class Verdict(NamedTuple):
    """One pool check: equivalent?, how it ended ("done" | "timeout" | "error"), did math-verify parse the gold
    (None when the check did not finish)."""

    ok: bool
    status: str
    gold_parsed: bool | None


class _Worker:
    """One `_verify_worker.py` process; state 'starting' until it prints 'ready', then 'idle' / 'busy'."""

    def __init__(self, seconds: int, script: str = _WORKER):
        self.proc = subprocess.Popen(
            [sys.executable, "-u", script, str(seconds)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        self.state, self.task, self.deadline = "starting", -1, time.monotonic() + _STARTUP_S

    def send(self, i: int, pair: tuple[str, str], timeout: float) -> None:
        self.proc.stdin.write(json.dumps(pair) + "\n")
        self.proc.stdin.flush()
        self.state, self.task, self.deadline = "busy", i, time.monotonic() + timeout

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:  # unflushed input to a dead process
                pass


_STARTUP_S = 120.0  # importing sympy on a loaded machine; a worker that never starts is an error, not a 0


class VerifyPool:
    """Worker processes checking (answer, gold) pairs with math-verify; a check still running `timeout` seconds
    after it was handed out is killed (its worker replaced) and scores False. Workers start lazily and live on."""

    def __init__(self, workers: int | None = None, timeout: float = 5.0, script: str = _WORKER):
        self.workers = workers or max(1, min(8, os.cpu_count() or 1))
        self.script = script  # the worker program (tests swap in one that hangs or crashes)
        self.timeout = timeout
        self.seconds = max(1, int(timeout) - 1)  # math-verify's own timeout, inside our deadline
        self.pool: list[_Worker] = []
        self.kills = 0  # checks that hit the deadline (for logging)
        self._crashes = 0

    def _replace(self, k: int) -> None:
        self.pool[k].kill()
        self.pool[k] = _Worker(self.seconds, self.script)

    def _on_line(self, k: int, line: str, results: list[Verdict]) -> None:
        w = self.pool[k]
        if not line:  # EOF: the worker died (out of memory, killed...): its check scores False, replace it
            self._crashes += 1
            if self._crashes > 3 * self.workers + 3:
                raise RuntimeError(f"math-verify workers keep dying (exit code {w.proc.poll()}); see stderr")
            if w.state == "busy":
                results[w.task] = Verdict(False, "error", None)
            self._replace(k)
        elif w.state == "starting":
            w.state = "idle"
        else:
            ok, _, parsed = line.strip().partition(" ")
            results[w.task] = Verdict(ok == "1", "done", parsed != "0")
            w.state = "idle"
            self._crashes = 0

    def check(self, pairs: list[tuple[str, str]]) -> list[Verdict]:
        """Check every (answer, gold) pair; verdicts in input order."""
        results = [Verdict(False, "error", None)] * len(pairs)
        todo = list(range(len(pairs)))[::-1]
        while len(self.pool) < min(self.workers, len(pairs)):
            self.pool.append(_Worker(self.seconds, self.script))
        while todo or any(w.state == "busy" for w in self.pool):
            for k, w in enumerate(self.pool):
                if w.state == "idle" and todo:
                    i = todo.pop()
                    try:
                        w.send(i, pairs[i], self.timeout)
                    except OSError:  # died while idle: replace it, the task waits for the next free worker
                        todo.append(i)
                        self._replace(k)
            live = [k for k, w in enumerate(self.pool) if w.state != "idle"]
            left = min(self.pool[k].deadline for k in live) - time.monotonic()
            ready = wait([self.pool[k].proc.stdout for k in live], timeout=max(0.0, left))
            for k in live:
                if self.pool[k].proc.stdout in ready:
                    self._on_line(k, self.pool[k].proc.stdout.readline(), results)
            now = time.monotonic()
            for k, w in enumerate(self.pool):
                if w.state == "starting" and now >= w.deadline:
                    raise RuntimeError(f"math-verify worker did not start within {_STARTUP_S:.0f} s")
                if w.state == "busy" and now >= w.deadline:  # past the hard deadline: kill, replace, score 0
                    self.kills += 1
                    results[w.task] = Verdict(False, "timeout", None)
                    self._replace(k)
        return results

    def map(self, pairs: list[tuple[str, str]]) -> list[bool]:
        """Is each (answer, gold) pair equivalent? (`check` without the details.)"""
        return [v.ok for v in self.check(pairs)]

    def close(self) -> None:
        """Stop the workers (they hold no state worth a graceful exit)."""
        for w in self.pool:
            w.kill()
        self.pool = []


_POOL: VerifyPool | None = None


def default_pool() -> VerifyPool:
    global _POOL
    if _POOL is None:
        _POOL = VerifyPool()
        atexit.register(_POOL.close)
    return _POOL


# ----------------------------------------------------------------------------------------------------------------
# Public API


@dataclass(frozen=True)
class Grade:
    """The grade of one answer: reward 1.0/0.0, the extracted answer (None: none found), why, and whether
    math-verify could parse the gold (False: compared as normalised strings; None: not asked)."""

    reward: float
    answer: str | None
    reason: str  # "correct" | "wrong" | "no answer" | "answer too long" | "timeout" | "error"
    gold_parsed: bool | None = None


def grade_answers(answers: list[str | None], golds: list, pool: VerifyPool | None = None) -> list[Grade]:
    """Grade already extracted answers (None = no answer) against golds; pool checks run in parallel, each
    distinct (answer, gold) pair once."""
    if len(answers) != len(golds):
        raise ValueError(f"answers ({len(answers)}) and golds ({len(golds)}) differ in length")
    gs = [gold_str(g, f"golds[{i}]") for i, g in enumerate(golds)]
    out: list[Grade | None] = [None] * len(answers)
    ask: dict[tuple[str, str], list[int]] = {}
    for i, (a, g) in enumerate(zip(answers, gs)):
        if a is None:
            out[i] = Grade(0.0, None, "no answer")
        elif not isinstance(a, str):
            raise TypeError(f"answers[{i}]: expected str or None, got {type(a).__name__}")
        elif len(a) > MAX_ANSWER_CHARS:
            out[i] = Grade(0.0, a, "answer too long")
        elif (q := _quick(a, g)) is not None:
            out[i] = Grade(float(q), a, "correct" if q else "wrong", True)
        else:
            ask.setdefault((a, g), []).append(i)
    if ask:
        pairs = list(ask)
        for pair, v in zip(pairs, (pool or default_pool()).check(pairs)):
            reason = ("correct" if v.ok else "wrong") if v.status == "done" else v.status
            for i in ask[pair]:
                out[i] = Grade(float(v.ok), pair[0], reason, v.gold_parsed)
    return out


def grade_completions(completions: list[str], golds: list, pool: VerifyPool | None = None) -> list[Grade]:
    """Extract each completion's final answer and grade it against its gold (see `grade_answers`)."""
    if len(completions) != len(golds):
        raise ValueError(f"completions ({len(completions)}) and golds ({len(golds)}) differ in length")
    for i, c in enumerate(completions):
        if not isinstance(c, str):
            raise TypeError(f"completions[{i}]: expected str, got {type(c).__name__}")
    return grade_answers([extract_answer(c) for c in completions], golds, pool)


def math_rewards(completions: list[str], golds: list, pool: VerifyPool | None = None) -> list[float]:
    """1.0/0.0 for each (completion, gold); checks that need sympy run in parallel on the pool."""
    return [g.reward for g in grade_completions(completions, golds, pool)]


def math_reward(completion: str, gold, pool: VerifyPool | None = None) -> float:
    """1.0 if the completion's final answer equals `gold` mathematically, else 0.0 (bounded in time)."""
    if not isinstance(completion, str):
        raise TypeError(f"completion: expected str, got {type(completion).__name__}")
    return grade_answers([extract_answer(completion)], [gold_str(gold)], pool)[0].reward


def answers_equal(a: str, b: str, pool: VerifyPool | None = None) -> bool:
    """Are two extracted answers equivalent (b in the gold's role)? Used by majority voting."""
    return grade_answers([a], [b], pool)[0].reward == 1.0


def gold_parses(golds: list, pool: VerifyPool | None = None) -> list[bool]:
    """Can math-verify parse each gold? (Plain numbers: yes, without asking.) Golds it cannot parse are compared
    as normalised strings; evaluation reports how many there were."""
    gs = [gold_str(g, f"golds[{i}]") for i, g in enumerate(golds)]
    ask = sorted({g for g in gs if plain_number(g) is None and g})
    verdicts = dict(zip(ask, (pool or default_pool()).check([(g, g) for g in ask]))) if ask else {}
    return [bool(g) and (plain_number(g) is not None or verdicts[g].gold_parsed is not False) for g in gs]


def format_reward(completion: str) -> float:
    """1.0 if the completion states a final answer in a non-empty \\boxed{...}, else 0.0 (optional shaping)."""
    return 1.0 if last_boxed(completion) is not None else 0.0


def length_penalty(length: int, max_len: int, buffer: int) -> float:
    """DAPO's soft overlong punishment: 0 up to max_len - buffer, then linearly down to -1 at max_len (and -1
    beyond). An optional term added to the reward; buffer = 0 disables it."""
    if buffer <= 0 or length <= max_len - buffer:
        return 0.0
    if length >= max_len:
        return -1.0
    return -(length - (max_len - buffer)) / buffer
