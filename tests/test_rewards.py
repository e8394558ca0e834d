"""Tests for train/rewards.py: answer extraction, equivalence (math-verify + our clean-up), the real data
(every MATH-500 reference solution, every GSM8K `####` answer, AIME zero-padded and AMC float answers), and the
hard timeout of the worker pool (pathological input, hanging and crashing workers)."""

import json
import os
import sys
import textwrap
import time

import pytest

from train.rewards import (
    VerifyPool,
    answers_equal,
    as_number,
    clean,
    extract_answer,
    format_reward,
    length_penalty,
    math_reward,
    math_rewards,
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
        ("She makes $18.\n#### 18", "18"),
        ("#### 1,000\n", "1,000"),
        ("Adding up, the answer is 42.", "42"),
        ("Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
        ("The answer is: $-3$", "-3"),
        ("no answer here", None),
        ("", None),
    ],
)
def test_extract_answer(text, want):
    assert extract_answer(text) == want


@pytest.mark.parametrize(
    "raw, want",
    [
        ("1,000", "1000"), ("1{,}000", "1000"), ("11,\\! 111,\\! 111,\\! 100", "11111111100"),
        ("\\$32,\\!348", "32348"),
        ("90^\\circ", "90"), ("90^{\\circ}", "90"), ("90°", "90"), ("50\\%", "50"), ("5.4 \\text{ cents}", "5.4"),
        ("18 dollars", "18"), ("\\text{Evelyn}", "Evelyn"), ("\\textbf{(073)}", "073"),
        ("\\dfrac{3}{4}", "\\frac{3}{4}"),
        ("(1,2)", "(1,2)"), ("1,2", "1,2"),  # tuples and lists stay
    ],
)
def test_clean(raw, want):
    assert clean(raw) == want


def test_as_number():
    assert as_number("025") == 25
    assert as_number("-3.50") == as_number("-7/2")
    assert as_number("\\frac{3}{4}") == as_number("0.75")
    assert as_number("x") is None and as_number("1,2") is None and as_number("2\\sqrt{2}") is None


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
]
NOT_EQUIVALENT = [
    ("1/2", "0.51"), ("(1,2)", "[1,2]"), ("1000", "100"), ("2\\sqrt{2}", "\\sqrt{2}"), ("x+1", "x-1"),
    ("25", "250"), ("\\frac{1}{3}", "0.33"), ("(0,9)\\cup(9,36)", "(0,36)"), ("-5", "5"), ("12", "1,2"),
    ("\\text{Evelyn}", "\\text{Navin}"), ("(3,\\pi/2)", "(3,\\pi)"), ("2,-1", "2,1"), ("x^2", "x^3"),
    ("1+2i", "1-2i"), ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}2\\\\1\\end{pmatrix}"),
    ("y=2x", "y=3x"), ("E", "C"), ("1,000", "1"),
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


def test_math500_every_gold_answer_parses_with_math_verify(shared_data, pool):
    """The sympy path must understand each non-numeric gold answer (what a differently-written model answer is
    compared against): every one is equal to itself through math-verify alone."""
    answers = sorted({clean(r["answer"]) for r in _rows(shared_data, "math500")})
    answers = [a for a in answers if as_number(a) is None]
    t = time.time()
    got = pool.map([(a, a) for a in answers])
    print(f"math-verify on {len(answers)} MATH-500 answers: {time.time() - t:.1f} s")
    assert all(got), [a for a, g in zip(answers, got) if not g]


def test_math500_wrong_answers_rejected(shared_data, pool):
    rows = _rows(shared_data, "math500")[:150]
    pairs = [(a["solution"], b["answer"]) for a, b in zip(rows, rows[1:] + rows[:1])]
    pairs = [(s, g) for (s, g), a in zip(pairs, rows) if clean(a["answer"]) != clean(g) and "=" not in a["answer"] + g]
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
