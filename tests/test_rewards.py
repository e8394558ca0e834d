"""Tests for train/rewards.py and train/_verify_worker.py: answer extraction (linear time), equivalence (math-verify
+ our few additions), the real data (every MATH-500 reference solution, every GSM8K `####` answer, AIME zero-padded
and AMC float answers), bad input (1 MB adversarial completions, non-string arguments) and the hard timeout of the
worker pool (pathological input, hanging and crashing workers). The perturbation suite over every MATH-500 and
GSM8K gold is tests/test_grading_suite.py."""

import json
import os
import random
import re
import sys
import textwrap
import time

import pytest

from train._verify_worker import prepare
from train.rewards import (
    MAX_ANSWER_CHARS,
    VerifyPool,
    answers_equal,
    extract_answer,
    format_reward,
    gold_parses,
    grade_completions,
    last_boxed,
    length_penalty,
    math_reward,
    math_rewards,
    plain_number,
)


@pytest.fixture(scope="module")
def pool():
    p = VerifyPool(workers=2, timeout=8.0)
    yield p
    p.close()


def _rows(shared_data, name):
    with open(os.path.join(shared_data, name, "test.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------------------------
# Extraction


@pytest.mark.parametrize(
    "text, want",
    [
        ("first \\boxed{1} then \\boxed{2}", "2"),  # the LAST box, not math-verify's first
        ("\\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("so $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces inside
        ("or $\\framebox{204}$ minutes", "204"),
        ("\\fbox{7}", "7"),
        ("\\boxed 5.", "5"),
        ("\\boxed{3} and an unclosed \\boxed{4", "3"),  # malformed last box -> the previous one
        ("\\boxed{}", None),
        ("\\boxed{2} then \\boxed{ }", "2"),  # an empty last box -> the previous one
        ("\\boxed{\\boxed{1}}", "1"),  # nested: the later command
        ("\\boxed{x} then \\boxed 7", "7"),
        ("stray } and { then \\boxed{a{b}c} }", "a{b}c"),
        ("\\boxeds{1} \\\\boxed{2}", None),  # not box commands: \boxeds, and `\\` (a line break) then "boxed"
        ("She makes $18.\n#### 18", "18"),
        ("#### 1,000\n", "1,000"),
        ("Adding up, the answer is 42.", "42"),
        ("Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
        ("The answer is: $-3$", "-3"),
        ("So the answer is 3. Wait, no: the answer is 5. Done.", "5"),  # the last statement, up to its sentence end
        ("The answer is $5$ dollars.", "5"),
        ("#### 7\n#### \n", "7"),  # the last non-empty #### line
        ("no answer here", None),
        ("", None),
    ],
)
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def _reference_last_boxed(text: str) -> str | None:
    """The spec of last_boxed, quadratic and plain: box commands from the last to the first; a command's own
    backslash must not be escaped (odd run of backslashes before it); after whitespace, either a '{' whose
    matching '}' (escaped braces skipped) closes a non-empty content, or a `[^\\s$]+` token."""
    cmds = [m for m in re.finditer(r"\\(?:boxed|fbox|framebox)(?![A-Za-z])", text)]
    for m in reversed(cmds):
        run = len(text[: m.start()]) - len(text[: m.start()].rstrip("\\"))
        if run % 2:
            continue
        k = m.end()
        while k < len(text) and text[k].isspace():
            k += 1
        if k < len(text) and text[k] == "{":
            depth, j = 0, k
            while j < len(text):
                if text[j] == "\\":
                    j += 2
                    continue
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    if text[k + 1 : j].strip():
                        return text[k + 1 : j].strip()
                    break
                j += 1
        elif k > m.end() and k < len(text):
            t = re.match(r"[^\s$]+", text[k:])
            if t and t.group().rstrip(".,"):
                return t.group().rstrip(".,")
    return None


def test_last_boxed_matches_the_reference_on_random_text():
    rng = random.Random(0)
    pieces = ["\\boxed", "\\fbox", "\\framebox", "\\boxeds", "{", "{", "}", "}", "\\", "\\{", "\\}", " ", "\n",
              "a", "1", "$", ".", "\\frac", "\xa0", "\u2003", "\\\\"]
    for _ in range(4000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 30)))
        assert last_boxed(text) == _reference_last_boxed(text), text


@pytest.mark.parametrize(
    "raw, want",
    [
        ("104.", "104"),  # AIME 2024's reference solution boxes `104.`
        ("\\textbf{(073)}", "073"), ("\\text{ 5 }", "5"),  # AIME 2024: `\\boxed{\\textbf{(073)}}`
        ("\\textbf{(C)}", "\\textbf{(C)}"), ("\\text{(5}", "\\text{(5}"),
        ("3, 5, 7.", "3, 5, 7"), ("\\text{Evelyn}.", "\\text{Evelyn}"), ("1, 2, 3, \\ldots", "1, 2, 3, \\ldots"),
        ("18 dollars", "18"), ("18 dollars.", "18"), ("1,000 square feet", "1000"),
        ("5 pi", "5 pi"), ("2 x", "2 x"), ("3 times", "3 times"),  # mathematics, not units: left for math-verify
        ("x = 10,\\!080", "x = 10080"), ("11,\\! 111,\\! 111,\\! 100", "11111111100"), ("\\$32,\\!348", "\\$32348"),
        ("1{,}000 \\text{ cm}", "1000 \\text{ cm}"), ("12,345.5", "12345.5"),
        # never inside tuples, intervals, sets, lists (the bug this module once had)
        ("[1,100]", "[1,100]"), ("(2,12) \\cup (12,102)", "(2,12) \\cup (12,102)"), ("1,000,2", "1,000,2"),
        ("58, 500", "58, 500"), ("0,500", "0,500"), ("\\{1,000\\}", "\\{1,000\\}"),
    ],
)
def test_prepare_only_where_safe(raw, want):
    assert prepare(raw) == want


def test_plain_number():
    assert plain_number("025") == 25 and plain_number("1,000") == 1000 and plain_number("18.") == 18
    assert plain_number("-3.50") == plain_number("-7/2")
    for s in ("x", "1,2", "2\\sqrt{2}", "1e3", "(1,000)", "1,00", "\\frac{3}{4}", "1" * 41):
        assert plain_number(s) is None, s


# ---------------------------------------------------------------------------------------------------------------
# Equivalence

EQUIVALENT = [
    ("\\frac{1}{2}", "0.5"), ("1/2", "\\frac12"), ("\\dfrac{3}{4}", "0.75"), ("1,000", "1000"), ("10,\\!080", "10080"),
    ("30^\\circ", "30"), ("30", "30 degrees"), ("5 \\text{ cm}", "5"), ("\\$18.90", "18.9"), ("50\\%", "50"),
    ("025", "25"), ("\\sqrt{8}", "2\\sqrt{2}"), ("\\left(3, \\frac{\\pi}{2}\\right)", "(3,\\pi/2)"),
    ("x^2+2x+1", "(x+1)^2"), ("\\text{(C)}", "C"), ("2,-1", "-1,2"), ("x=5", "5"), ("[1,2]", "x \\in [1,2]"),
    ("3\\sqrt{13}", "\\sqrt{117}"), ("1\\frac{4}{5}", "9/5"), ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}"),
    ("864 \\mbox{ inches}^2", "864"), ("\\begin{pmatrix} 1/5 \\\\ -18/5 \\end{pmatrix}",
                                      "\\begin{pmatrix} 0.2 \\\\ -3.6 \\end{pmatrix}"),
    ("\\{1\\pm\\sqrt{5},-2\\}", "-2, 1+\\sqrt5, 1-\\sqrt5"), ("(-\\infty, 2) \\cup (3, \\infty)",
                                                               "(3,\\infty)\\cup(-\\infty,2)"),
    ("y = 2x + 3", "2x+3"), ("6 - 5i", "-5i+6"), ("\\frac{270}7\\text{ degrees}", "270/7"), ("2k+2", "2(k+1)"),
    ("\\text{Evelyn}", "Evelyn"), ("\\textbf{(C)}", "C"),
    # the two examples (a clean-up once turned `(2,12) \\cup (12,102)` into `(2,12) \\cup (12102)`)
    ("(2,12) \\cup (12,102)", "(2, 12) \\cup (12, 102)"), ("[1,100]", "[1, 100]"),
    ("10,\\!080", "x = 10,\\!080"), ("104", "104."), ("18", "18 dollars"), (".0000672", "6.72 \\times 10^{-5}"),
]
NOT_EQUIVALENT = [
    ("1/2", "0.51"), ("(1,2)", "[1,2]"), ("1000", "100"), ("2\\sqrt{2}", "\\sqrt{2}"), ("x+1", "x-1"),
    ("25", "250"), ("\\frac{1}{3}", "0.33"), ("(0,9)\\cup(9,36)", "(0,36)"), ("-5", "5"), ("12", "1,2"),
    ("\\text{Evelyn}", "\\text{Navin}"), ("(3,\\pi/2)", "(3,\\pi)"), ("2,-1", "2,1"), ("x^2", "x^3"),
    ("1+2i", "1-2i"), ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}2\\\\1\\end{pmatrix}"),
    ("y=2x", "y=3x"), ("E", "C"), ("1,000", "1"),
    ("(2,12) \\cup (12,102)", "(2,12) \\cup (12102)"), ("[1,100]", "[1100]"), ("58,500", "58, 500"),
    (".0000672", ".0000673"),  # math-verify alone rounds both to 6 decimals; the gold writes 7
    ("5", "5 pi"), ("2", "2 x"),
]


def test_equivalent_and_non_equivalent_pairs(pool):
    golds = [g for g, _ in EQUIVALENT + NOT_EQUIVALENT]
    comps = [f"Thus the result is $\\boxed{{{p}}}$." for _, p in EQUIVALENT + NOT_EQUIVALENT]
    got = math_rewards(comps, golds, pool=pool)
    want = [1.0] * len(EQUIVALENT) + [0.0] * len(NOT_EQUIVALENT)
    bad = [(g, c) for g, c, a, b in zip(golds, comps, got, want) if a != b]
    assert not bad, bad


def test_answers_equal_is_symmetric_enough(pool):
    assert answers_equal("\\frac{1}{2}", "0.5", pool=pool) and answers_equal("0.5", "\\frac{1}{2}", pool=pool)
    assert not answers_equal("2", "3", pool=pool)


# ---------------------------------------------------------------------------------------------------------------
# Real data


def test_math500_every_reference_solution_accepted(shared_data, pool):
    rows = _rows(shared_data, "math500")
    assert len(rows) == 500
    got = math_rewards([r["solution"] for r in rows], [r["answer"] for r in rows], pool=pool)
    bad = [r["unique_id"] for r, g in zip(rows, got) if g != 1.0]
    assert not bad, bad


def test_every_gold_answer_parses_with_math_verify(shared_data, pool):
    """The sympy path must understand each non-numeric gold answer (what a differently-written model answer is
    compared against): math-verify parses every MATH-500, AIME and AMC gold, and each equals itself through it."""
    golds = sorted({str(r["answer"]) for name in ("math500", "aime24", "amc23") for r in _rows(shared_data, name)})
    assert all(gold_parses(golds, pool=pool))
    answers = [a for a in golds if plain_number(a) is None]
    t = time.time()
    got = pool.check([(a, a) for a in answers])
    print(f"math-verify on {len(answers)} non-numeric gold answers: {time.time() - t:.1f} s")
    assert all(v.ok and v.gold_parsed for v in got), [a for a, v in zip(answers, got) if not v.ok]


def test_unparsable_gold_is_compared_as_a_normalised_string(pool):
    """A gold math-verify cannot parse (here: nothing it recognises as mathematics) is compared as a string."""
    gold = "\\frac{"
    assert gold_parses([gold, "\\frac12", "7", ""], pool=pool) == [False, True, True, False]
    g = grade_completions(["#### \\frac {", "#### \\frac"], [gold, gold], pool=pool)
    assert [x.reward for x in g] == [1.0, 0.0] and [x.gold_parsed for x in g] == [False, False]


def test_math500_wrong_answers_rejected(shared_data, pool):
    rows = _rows(shared_data, "math500")[:150]
    pairs = [(a["solution"], b["answer"], a["answer"]) for a, b in zip(rows, rows[1:] + rows[:1])]
    pairs = [(s, g) for s, g, own in pairs if own.strip() != g.strip() and "=" not in own + g]
    got = math_rewards([s for s, _ in pairs], [g for _, g in pairs], pool=pool)
    assert sum(got) == 0, [g for (_, g), v in zip(pairs, got) if v]


def test_gsm8k_hash_answers(shared_data, pool):
    rows = _rows(shared_data, "gsm8k")
    assert len(rows) == 1319
    finals = [r["answer"].split("####")[-1].strip() for r in rows]
    assert any("," in f for f in finals)  # thousands separators exist in the data
    assert math_rewards([r["answer"] for r in rows], finals, pool=pool) == [1.0] * len(rows)
    ints = [int(f.replace(",", "")) for f in finals]
    assert math_rewards([r["answer"] for r in rows], ints, pool=pool) == [1.0] * len(rows)
    said = [f"Step by step... so the answer is {f}." for f in finals]
    assert math_rewards(said, ints, pool=pool) == [1.0] * len(rows)
    shifted = ints[1:] + ints[:1]
    got = math_rewards([r["answer"] for r in rows], shifted, pool=pool)
    assert got == [float(a == b) for a, b in zip(ints, shifted)]


def test_aime_zero_padded_and_amc_float_answers(shared_data, pool):
    aime = _rows(shared_data, "aime24")
    assert any(r["answer"].startswith("0") for r in aime)
    assert math_rewards([f"\\boxed{{{int(r['answer'])}}}" for r in aime], [r["answer"] for r in aime], pool=pool) == [
        1.0
    ] * len(aime)
    assert math_rewards([r["solution"] for r in aime], [r["answer"] for r in aime], pool=pool) == [1.0] * len(aime)
    amc = _rows(shared_data, "amc23")
    comps = [f"\\boxed{{{r['answer']:g}}}" for r in amc]
    assert math_rewards(comps, [r["answer"] for r in amc], pool=pool) == [1.0] * len(amc)
    assert math_reward("\\boxed{28}", 27.0, pool=pool) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Time bounds and failure handling


MB = 2**20
ADVERSARIAL = {  # 1 MB completions a policy under RL can produce
    "spaces after ####": "#### 1" + " " * MB + "x",  # the cases: once > 1 min each (backtracking regexes)
    "spaces inside a box": "\\boxed{1" + " " * MB + "x}",
    "\\boxed{ x 10,000": "\\boxed{" * 10_000,  # once O(n^2): the last-box search rescanned the text per match
    "\\boxed{ x 1 MB": "\\boxed{" * (MB // 7),
    "nested closed boxes": "\\boxed{" * (MB // 16) + "1" + "}" * (MB // 16),
    "unbalanced {": "{" * MB,
    "unbalanced }": "}" * MB,
    "empty boxes": "\\boxed{ }" * (MB // 9),
    "exponent tower": "\\boxed{" + "9^{" * (MB // 4) + "9" + "}" * (MB // 4) + "}",
    "backslashes": "\\" * MB,
    "####": "#" * MB,
    "spaces": " " * MB,
    "the answer is": "the answer is " * (MB // 14),
    "\\boxed 1 MB token": "\\boxed " + "9" * MB,
    "{} pairs in a box": "\\boxed{" + "{}" * (MB // 2),
    "escaped braces in a box": "\\boxed{" + "\\{" * (MB // 2),
}


@pytest.fixture(scope="module")
def quick_pool():
    p = VerifyPool(workers=1, timeout=1.5)
    p.map([("\\sqrt{2}", "\\sqrt{2}")])  # start the worker (startup is not part of a call)
    yield p
    p.close()


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_1mb_completion_is_bounded(name, quick_pool):
    text = ADVERSARIAL[name]
    t = time.time()
    g = grade_completions([text], ["2"], pool=quick_pool)[0]
    dt = time.time() - t
    assert dt < 2.0, f"{name}: {dt:.2f} s"
    assert g.reward == 0.0 and g.reason in ("no answer", "answer too long", "wrong", "timeout"), g


def test_deep_tower_under_the_length_cap_hits_the_deadline_cleanly(quick_pool):
    """An answer short enough for math-verify but pathological for sympy: 0.0 within the pool's deadline."""
    tower = "9^{" * 1000 + "9" + "}" * 1000
    assert len(tower) <= MAX_ANSWER_CHARS
    t = time.time()
    g = grade_completions([f"\\boxed{{{tower}}}"], ["1"], pool=quick_pool)[0]
    assert time.time() - t < 2.0 and g.reward == 0.0 and g.reason in ("wrong", "timeout")
    assert math_reward("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", pool=quick_pool) == 1.0  # the pool still works


def test_reasons():
    g = grade_completions(["no final answer here", "\\boxed{" + "1" * (MAX_ANSWER_CHARS + 1) + "}", "#### 7", "#### 8"],
                          ["7"] * 4)
    assert [(x.reward, x.answer is None, x.reason) for x in g] == [
        (0.0, True, "no answer"), (0.0, False, "answer too long"), (1.0, False, "correct"), (0.0, False, "wrong")]


def test_non_string_arguments_raise_type_errors_naming_them():
    for bad in (None, b"1", [1], True, float("nan")):
        with pytest.raises(TypeError, match="gold"):
            math_reward("\\boxed{1}", bad)
    with pytest.raises(TypeError, match="golds\\[1\\]"):
        math_rewards(["\\boxed{1}", "\\boxed{2}"], ["1", None])
    with pytest.raises(TypeError, match="completion: expected str, got NoneType"):
        math_reward(None, "1")
    with pytest.raises(TypeError, match="completions\\[1\\]: expected str, got bytes"):
        math_rewards(["\\boxed{1}", b"\\boxed{1}"], ["1", "1"])
    assert math_reward("\\boxed{27}", 27) == 1.0 and math_reward("\\boxed{27}", 27.0) == 1.0  # numbers are golds


def test_pathological_expression_returns_zero_quickly():
    p = VerifyPool(workers=1, timeout=2.0)
    try:
        assert math_reward("\\boxed{1}", "1", pool=p) == 1.0  # warm the worker
        t = time.time()
        assert math_reward("\\boxed{9^{9^{9^{9^{9}}}}}", "2", pool=p) == 0.0
        assert time.time() - t < 6.0
        assert math_reward("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", pool=p) == 1.0  # still works afterwards
    finally:
        p.close()


def _script(tmp_path, body):
    path = tmp_path / "worker.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_hanging_worker_is_killed_at_the_deadline(tmp_path):
    hang = _script(tmp_path, """
        import sys, time
        print("ready", flush=True)
        for line in sys.stdin:
            time.sleep(1000)
    """)
    p = VerifyPool(workers=2, timeout=0.5, script=hang)
    try:
        p.map([("1", "1")])  # start the workers (startup is not counted against the deadline)
        t = time.time()
        assert p.map([("a", "b")] * 4) == [False] * 4
        assert time.time() - t < 0.5 * 2 + 3.0  # two rounds of two workers, plus restart slack
        assert p.kills == 5
    finally:
        p.close()


def test_crashing_worker_raises_instead_of_scoring_zero(tmp_path):
    crash = _script(tmp_path, "import sys\nsys.exit(3)\n")
    p = VerifyPool(workers=1, timeout=1.0, script=crash)
    try:
        with pytest.raises(RuntimeError, match="keep dying"):
            p.map([("x", "y")])
    finally:
        p.close()


def test_batch_matches_single_calls(pool):
    comps = ["\\boxed{\\sqrt{8}}", "#### 12", "\\boxed{x+1}", "nothing", "\\boxed{0.5}"] * 4
    golds = ["2\\sqrt{2}", "12", "1+x", "1", "1/2"] * 4
    batch = math_rewards(comps, golds, pool=pool)
    assert batch == [math_reward(c, g, pool=pool) for c, g in zip(comps, golds)]
    assert batch[:5] == [1.0, 1.0, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="golds"):
        math_rewards(["a"], [], pool=pool)


def test_format_and_length_terms():
    assert format_reward("so \\boxed{3}") == 1.0
    assert format_reward("so 3") == 0.0 and format_reward("\\boxed{}") == 0.0
    assert length_penalty(10, 100, 20) == 0.0
    assert length_penalty(80, 100, 20) == 0.0
    assert length_penalty(90, 100, 20) == pytest.approx(-0.5)
    assert length_penalty(100, 100, 20) == -1.0 and length_penalty(150, 100, 20) == -1.0
    assert length_penalty(99, 100, 0) == 0.0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
