"""Worker process for train.rewards.VerifyPool: the whole equivalence check of one (answer, gold) pair, under the
pool's hard deadline.

Protocol: reads JSON lines `[answer, gold]` on stdin (both the extracted final answers, untouched), writes one line
`OK PARSED` per pair: OK = 1 if equivalent else 0, PARSED = 1 if math-verify parsed the gold else 0 (then the two
were compared as normalised strings). Prints `ready` once math-verify is imported.

The check (`check`): math-verify's own normalisation does the work (intervals, tuples, sets, spaces after commas,
`\\left`/`\\right`, `\\dfrac`, `$`, `\\text{units}`, `^\\circ`, percent, `x = ...`, thousands separators written
`1,000` / `1{,}000` / `10,\\!080`). In front of it `prepare` adds only what it misses, each with a real-data case in
tests/test_rewards.py; every rule looks at the WHOLE answer, never inside tuples or lists:
  - one trailing sentence period is dropped (AIME 2024: `\\boxed{104.}`; math-verify leaves `3, 5, 7.` unparsed);
  - a lone number followed by plain lower-case words, `18 dollars`, is the number (math-verify reads
    `18*d*o*l*l*a*r*s`; its own unit list covers `\\text{...}`, `cm`, `hours`, ... but not arbitrary nouns);
  - a lone number set in text, `\\textbf{(073)}`, is the number (AIME 2024's reference solutions box the
    zero-padded answer that way; math-verify reads the name `073`);
  - thousands separators are removed when the whole answer is one number written with them, also after `x =`
    (MATH-500's `10,\\!080` written `x = 10,\\!080`: math-verify reads a list there). Never inside a tuple,
    interval, set or list: `[1,100]` and `(2,12) \\cup (12,102)` reach math-verify as they are.
And `verify` rounds floats to at least as many decimals as the gold writes (its default of 6 accepts `.0000673`
for MATH-500's `.0000672`).

Run as a plain script (`python train/_verify_worker.py SECONDS`) so it never re-imports the caller's main module
and is safe to start from a process that already runs torch/CUDA threads. math-verify's own SIGALRM timeout works
here (this is a main thread); the parent kills us if even that does not return in time. Standard library and
math-verify only: no imports from the package.
"""

import functools
import json
import logging
import re
import sys

_NUM = r"[-+]?(?:\d+(?:\.\d+)?|\.\d+|[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?)"
_NUM_WORDS_RE = re.compile(rf"({_NUM})\s+([a-z]{{3,}}(?:\s+[a-z]{{3,}}){{0,2}})")
# words that are mathematics, not units: "5 pi" is not 5
_MATH_WORDS = {"pi", "sqrt", "sin", "cos", "tan", "cot", "sec", "csc", "log", "exp", "inf", "infty", "infinity",
               "mod", "and", "or", "times", "cdot", "over", "plus", "minus", "div", "choose", "dots", "ldots"}
_DECIMALS_RE = re.compile(r"\.(\d+)")
_TEXT_NUMBER_RE = re.compile(r"\\(?:text|textbf|mathbf|mathrm|mbox)\{\s*(\(?)\s*([-+]?\d+(?:\.\d+)?)\s*(\)?)\s*\}")
_SEP = r",\\!\s*|\{,\}|,"  # 10,\!080  1{,}000  1,000
# the whole answer is ONE number written with separators, maybe after `x =` / `\$`, maybe before a \text unit
_SEPARATED_RE = re.compile(rf"((?:[A-Za-z]\s*=\s*)?(?:\\\$\s*)?)([-+]?[1-9]\d{{0,2}}(?:(?:{_SEP})\d{{3}})+(?:\.\d+)?)"
                           r"((?:\s*\\(?:text|mbox)\{[^{}]*\})?)")


def prepare(s: str) -> str:
    """The answer as math-verify should see it (see the module docstring); never changes its meaning."""
    s = s.strip()
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    m = _TEXT_NUMBER_RE.fullmatch(s)
    if m and len(m.group(1)) == len(m.group(3)):
        s = m.group(2)
    m = _NUM_WORDS_RE.fullmatch(s)
    if m and not _MATH_WORDS.intersection(m.group(2).split()):
        s = m.group(1)
    m = _SEPARATED_RE.fullmatch(s)
    if m:
        s = m.group(1) + re.sub(_SEP, "", m.group(2)) + m.group(3)
    return s


def decimals(s: str) -> int:
    """Most digits written after a decimal point in `s` ('.0000672' -> 7)."""
    return max((len(m.group(1)) for m in _DECIMALS_RE.finditer(s)), default=0)


def normalised_string(s: str) -> str:
    """For golds math-verify cannot parse: its LaTeX clean-up, \\text{} unwrapped, no spaces, case-folded."""
    from latex2sympy2_extended.latex2sympy2 import NormalizationConfig, normalize_latex

    cfg = NormalizationConfig(basic_latex=True, units=True, malformed_operators=False, nits=True, boxed="none")
    s = normalize_latex(s, config=cfg)
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    return "".join(s.split()).casefold()


@functools.lru_cache(maxsize=4096)
def parsed(text: str, seconds: int):
    """Parse once per distinct answer: in GRPO all G completions of a problem share the gold (and often answers)."""
    from math_verify import parse

    return parse("\\boxed{" + text + "}", parsing_timeout=seconds)


def check(pred: str, gold: str, seconds: int) -> tuple[bool, bool]:
    """(equivalent, gold parsed by math-verify) for two extracted answers."""
    from math_verify import verify

    p, g = prepare(pred), prepare(gold)
    G = parsed(g, seconds)
    if not any(not isinstance(x, str) for x in G):  # math-verify found no expression: compare strings
        a, b = normalised_string(p), normalised_string(g)
        return bool(b) and a == b, False
    P = parsed(p, seconds)
    if not P:
        return False, True
    return bool(verify(G, P, float_rounding=max(6, decimals(g)), timeout_seconds=seconds)), True


def main() -> None:
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    logging.disable(logging.WARNING)  # math-verify logs every parse failure / timeout
    import math_verify  # noqa: F401  (import before announcing readiness)

    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        ok, gold_parsed = False, True
        try:
            pred, gold = json.loads(line)
            ok, gold_parsed = check(pred, gold, seconds)
        except BaseException:  # noqa: BLE001 - sympy raises anything, RecursionError and TimeoutException included
            ok = False
        sys.stdout.write(f"{int(ok)} {int(gold_parsed)}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    try:
        main()
    except (BrokenPipeError, KeyboardInterrupt):  # the parent went away or closed us: nothing to report
        sys.exit(0)
