"""Verifiable rewards for math RL: is the completion's final answer equal to the gold answer?

`math_reward(completion, gold)` returns 1.0 or 0.0. The final answer is the LAST `\\boxed{...}` (or `\\fbox`,
`\\framebox`) of the completion; without one, the last GSM8K-style `#### x` line; else a closing "the answer is x".
Equivalence is decided by math-verify (sympy underneath) after a light clean-up of what it misses or we want
treated as equal: thousands separators (`1,000`, `1{,}000`, `1\\,000`), degrees (`^\\circ`, `°`), percent signs,
trailing units (`5 \\text{ cm}`, `18 dollars`), `\\$`, zero-padded integers (AIME `025`).

Plain numbers on both sides are compared exactly in-process (Fractions), which covers GSM8K/AIME/AMC and the toy
task without any sympy call. Everything else goes to a `VerifyPool`: long-lived worker processes, each check with a
hard deadline; a worker past it is killed and replaced and the check scores 0.0, so a pathological expression
never stalls training. (math-verify's own timeout uses SIGALRM, which only works in a main thread; inside our
workers it does, and we keep it as a first line, but the kill is what bounds the time.)

Batch API: `math_rewards(completions, golds)` scores many completions in parallel over the pool.
Optional shaping terms, kept separate so the trainer can weight them: `format_reward`, `length_penalty`.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import subprocess
import sys
import time
from fractions import Fraction
from multiprocessing.connection import wait

# ----------------------------------------------------------------------------------------------------------------
# Extracting the final answer

_BOX_RE = re.compile(r"\\(?:boxed|fbox|framebox)\b")
_HASH_RE = re.compile(r"^\s*####\s*(.+?)\s*$", re.MULTILINE)
_ANSWER_IS_RE = re.compile(r"answer\s+is\s*[:：]?\s*(.+)", re.IGNORECASE | re.DOTALL)


def _braced(text: str, i: int) -> tuple[str, int] | None:
    """Content of the brace group opening at text[i] == '{' and the index after its '}'; None if unbalanced."""
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c == "\\":  # an escaped character (\{, \}, \\) does not count
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j], j + 1
        j += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last well-formed \\boxed{...} / \\fbox{...} / \\framebox{...} (also `\\boxed 5`)."""
    for m in reversed(list(_BOX_RE.finditer(text))):
        k = m.end()
        while k < len(text) and text[k] == " ":
            k += 1
        if k < len(text) and text[k] == "{":
            got = _braced(text, k)
            if got is not None and got[0].strip():
                return got[0].strip()
        elif k > m.end():  # `\boxed 5`: the next token
            tok = re.match(r"[^\s$]+", text[k:])
            if tok:
                return tok.group(0).rstrip(".,")
    return None


def _answer_is(text: str) -> str | None:
    """'... the answer is x.' near the end of the text (the last occurrence, its first line, up to 200 chars)."""
    tail = text[-2000:]
    hits = list(_ANSWER_IS_RE.finditer(tail))
    if not hits:
        return None
    ans = hits[-1].group(1).strip().split("\n")[0][:200]
    ans = re.sub(r"\s*(?:I hope it is correct|\.\s*$).*$", "", ans).strip()
    ans = ans.strip("$ ").rstrip(".").strip("$ ")
    return ans or None


def extract_answer(text: str) -> str | None:
    """The completion's final answer as a string: last box, else last `#### x` line, else 'the answer is x'."""
    if not text:
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    hashes = _HASH_RE.findall(text)
    if hashes:
        return hashes[-1]
    return _answer_is(text)


# ----------------------------------------------------------------------------------------------------------------
# Clean-up and the exact fast path for plain numbers

_UNIT_TEXT_RE = re.compile(r"^(.*?\S)\s*(?:\\[,;! ]|~)*\s*\\(?:text|mbox|mathrm)\{\s*[A-Za-z][A-Za-z .\^0-9{}]*\}$")
_NUM_RE = re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?$")
_NUM_WORDS_RE = re.compile(r"^([-+]?(?:\d+(?:\.\d*)?|\.\d+))\s+[A-Za-z][A-Za-z \-]*\.?$")
_SEP = r",\\!\s*|,|\{,\}|\\,|\\!"  # 1,000  1,\!000  1,\! 000  1{,}000  1\,000  1\!000
_THOUSANDS_RE = re.compile(rf"(?<![\d.])(\d{{1,3}}(?:(?:{_SEP})\d{{3}})+)(?![\d])")


def clean(ans: str) -> str:
    """String clean-up applied to both sides before comparison (see the module docstring)."""
    s = ans.strip().strip("$").strip()
    m = re.fullmatch(r"\\(?:text|textbf|mathbf|mathrm|mbox)\{([^{}]*)\}", s)  # \text{Evelyn}, \textbf{(C)}
    s = m.group(1).strip() if m else s
    s = re.sub(r"^\((\s*[-+]?\d+\s*)\)$", r"\1", s)  # (073) -> 073: a lone parenthesised number
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\left", "").replace("\\right", "")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree", "", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    s = _THOUSANDS_RE.sub(lambda m: re.sub(_SEP, "", m.group(1)), s)
    for _ in range(2):  # trailing `\text{ units}` after a value (kept when nothing precedes it)
        m = _UNIT_TEXT_RE.match(s)
        if m:
            s = m.group(1).strip()
    m = _NUM_WORDS_RE.match(s)  # "18 dollars" -> "18"
    if m:
        s = m.group(1)
    s = re.sub(r"^\\?(?:\s|\\,|\\ )*", "", s) if s.startswith("\\,") else s
    return s.strip().rstrip(".").strip()


def as_number(s: str) -> Fraction | None:
    """Exact value of a plain number ('025', '-3.50', '7/2', '1e3' excluded); None if `s` is not one."""
    s = s.replace(" ", "")
    m = re.fullmatch(r"([-+]?)\\frac\{?(\d+)\}?\{?(\d+)\}?", s)
    if m:
        s = f"{m.group(1)}{m.group(2)}/{m.group(3)}"
    if not _NUM_RE.match(s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def gold_str(gold) -> str:
    """Gold answers come as strings, ints or floats (AMC stores 27.0): integral floats become '27'."""
    if isinstance(gold, float) and gold.is_integer():
        return str(int(gold))
    return str(gold).strip()


# ----------------------------------------------------------------------------------------------------------------
# math-verify in worker processes with a hard deadline

_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_verify_worker.py")


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
    """Worker processes checking (pred, gold) pairs with math-verify; a check still running `timeout` seconds after
    it was handed out is killed (its worker replaced) and scores False. Workers start lazily and live on."""

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

    def _on_line(self, k: int, line: str, results: list[bool]) -> None:
        w = self.pool[k]
        if not line:  # EOF: the worker died (out of memory, killed...): its check scores False, replace it
            self._crashes += 1
            if self._crashes > 3 * self.workers + 3:
                raise RuntimeError(f"math-verify workers keep dying (exit code {w.proc.poll()}); see stderr")
            if w.state == "busy":
                results[w.task] = False
            self._replace(k)
        elif w.state == "starting":
            w.state = "idle"
        else:
            results[w.task] = line.strip() == "1"
            w.state = "idle"
            self._crashes = 0

    def map(self, pairs: list[tuple[str, str]]) -> list[bool]:
        """Check every (pred, gold) pair; results in input order."""
        results = [False] * len(pairs)
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
                    results[w.task] = False
                    self._replace(k)
        return results

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


def _quick(pred: str | None, gold: str) -> bool | None:
    """Decide in-process when possible: no answer, identical strings, or plain numbers on both sides."""
    if pred is None:
        return False
    p, g = clean(pred), clean(gold)
    if not p:
        return False
    if p == g:
        return True
    pn, gn = as_number(p), as_number(g)
    if pn is not None and gn is not None:
        return pn == gn
    return None


def math_rewards(completions: list[str], golds: list, pool: VerifyPool | None = None) -> list[float]:
    """1.0/0.0 for each (completion, gold); checks that need sympy run in parallel on the pool."""
    if len(completions) != len(golds):
        raise ValueError(f"completions ({len(completions)}) and golds ({len(golds)}) differ in length")
    out: list[float] = [0.0] * len(completions)
    slow: list[int] = []
    pairs: list[tuple[str, str]] = []
    for i, (c, g) in enumerate(zip(completions, golds)):
        g = gold_str(g)
        pred = extract_answer(c)
        q = _quick(pred, g)
        if q is None:
            slow.append(i)
            pairs.append((clean(pred), clean(g) or g))
        else:
            out[i] = float(q)
    if pairs:
        for i, ok in zip(slow, (pool or default_pool()).map(pairs)):
            out[i] = float(ok)
    return out


def math_reward(completion: str, gold, pool: VerifyPool | None = None) -> float:
    """1.0 if the completion's final answer equals `gold` mathematically, else 0.0 (bounded in time)."""
    return math_rewards([completion], [gold], pool=pool)[0]


def answers_equal(a: str, b: str, pool: VerifyPool | None = None) -> bool:
    """Are two extracted answers equivalent? (Used by majority voting.)"""
    q = _quick(a, b)
    if q is not None:
        return q
    return (pool or default_pool()).map([(clean(a), clean(b))])[0]


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
