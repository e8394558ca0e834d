"""The grading suite on real data: every MATH-500 gold answer (500) and every GSM8K answer (1,319), boxed (or
stated) in the equivalent forms people write, must be accepted — at least 99 % of the golds in every perturbation
family, all forms of a gold counted — and every changed answer must be refused (tests/answer_perturbations.py
builds both). The acceptance table is printed (`pytest -s` or `python tests/test_grading_suite.py`) and recorded in
train/README.md."""

import collections
import json
import os
import sys

import pytest
from answer_perturbations import (
    changed_answers,
    equivalent_forms,
    gsm8k_changed_answers,
    gsm8k_equivalent_forms,
)

from train.data import gsm8k_final
from train.rewards import VerifyPool, grade_completions

TARGET = 0.99


@pytest.fixture(scope="module")
def pool():
    p = VerifyPool(workers=2, timeout=8.0)
    yield p
    p.close()


def _rows(shared_data, name):
    with open(os.path.join(shared_data, name, "test.jsonl")) as f:
        return [json.loads(line) for line in f]


def _completion(variant: str) -> str:
    """A model's closing words around the final answer (GSM8K's `####` and "The answer is" forms stand alone)."""
    if variant.startswith(("####", "The answer is")):
        return f"Adding the two amounts gives the total.\n{variant}"
    return f"Simplifying, we get the final result.\nTherefore the answer is $\\boxed{{{variant}}}$."


def run_family_checks(golds: list[str], forms, pool) -> dict:
    """forms(i, gold) -> {family: [variants]}. Returns {family: {golds, accepted_golds, variants, accepted, refused
    examples}}; a gold counts as accepted in a family when all its variants there are."""
    items = [(i, g, fam, v) for i, g in enumerate(golds) for fam, vs in forms(i, g).items() for v in vs]
    grades = grade_completions([_completion(v) for *_, v in items], [g for _, g, _, _ in items], pool)
    table = collections.defaultdict(lambda: {"golds": set(), "failed_golds": set(), "variants": 0, "accepted": 0,
                                             "examples": {"accepted": [], "refused": []}})
    for (i, g, fam, v), gr in zip(items, grades):
        t = table[fam]
        t["golds"].add(i)
        t["variants"] += 1
        t["accepted"] += gr.reward == 1.0
        if gr.reward != 1.0:
            t["failed_golds"].add(i)
        t["examples"]["accepted" if gr.reward == 1.0 else "refused"].append((g, v, gr.reason))
    return {fam: {"golds": len(t["golds"]), "accepted_golds": len(t["golds"]) - len(t["failed_golds"]),
                  "variants": t["variants"], "accepted": t["accepted"], "examples": t["examples"]}
            for fam, t in table.items()}


def format_table(title: str, table: dict) -> str:
    """Markdown: per family the golds it applies to, those with every form accepted, forms and forms accepted."""
    lines = [title, "| family | golds | golds with all forms accepted | forms | forms accepted |",
             "|---|---:|---:|---:|---:|"]
    for fam, t in table.items():
        pct = 100 * t["accepted_golds"] / t["golds"]
        lines.append(f"| {fam} | {t['golds']} | {t['accepted_golds']} ({pct:.1f} %) | {t['variants']} "
                     f"| {t['accepted']} |")
    return "\n".join(lines)


def _math500_golds(shared_data):
    rows = _rows(shared_data, "math500")
    assert len(rows) == 500
    return [r["answer"] for r in rows]


def _gsm8k(shared_data):
    rows = _rows(shared_data, "gsm8k")
    assert len(rows) == 1319
    return [gsm8k_final(r["answer"]) for r in rows], [r["question"] for r in rows]


def _assert_accepted(table):
    print()
    print(format_table("equivalent forms", table))
    low = {fam: t["examples"]["refused"][:10] for fam, t in table.items()
           if t["accepted_golds"] < TARGET * t["golds"]}
    assert not low, low


def _assert_refused(table):
    print()
    print(format_table("changed answers", table))
    wrong = {fam: t["examples"]["accepted"] for fam, t in table.items() if t["accepted"]}
    assert not wrong, wrong


def test_math500_equivalent_forms_accepted(shared_data, pool):
    golds = _math500_golds(shared_data)
    table = run_family_checks(golds, lambda i, g: equivalent_forms(g), pool)
    assert {"comma spaces", "left/right", "frac style", "$...$", "trailing period", "x = ...", "text units",
            "degrees"} <= set(table)
    assert table["as is"]["golds"] == 500 and table["trailing period"]["golds"] == 500
    _assert_accepted(table)


def test_math500_changed_answers_refused(shared_data, pool):
    golds = _math500_golds(shared_data)
    table = run_family_checks(golds, lambda i, g: changed_answers(g), pool)
    assert {"first digit", "last digit", "swapped ends", "interval end", "dropped element"} <= set(table)
    assert table["first digit"]["golds"] > 450
    _assert_refused(table)


def test_gsm8k_equivalent_forms_accepted(shared_data, pool):
    answers, questions = _gsm8k(shared_data)
    table = run_family_checks(answers, lambda i, a: gsm8k_equivalent_forms(a, questions[i]), pool)
    assert table["as is"]["golds"] == 1319 and table["thousands"]["golds"] > 100 and table["percent"]["golds"] > 10
    _assert_accepted(table)


def test_gsm8k_changed_answers_refused(shared_data, pool):
    answers, _ = _gsm8k(shared_data)
    table = run_family_checks(answers, lambda i, a: gsm8k_changed_answers(a), pool)
    assert table["plus one"]["golds"] == 1319
    _assert_refused(table)


def test_the_generator_makes_what_it_says():
    """The perturbations themselves, on golds from MATH-500 (a wrong generator would make the suite vacuous)."""
    f = equivalent_forms("(2,12) \\cup (12,102)")
    assert f["comma spaces"] == ["(2, 12) \\cup (12, 102)"]
    assert f["left/right"] == ["\\left(2,12\\right) \\cup \\left(12,102\\right)"]
    assert "comma spaces" not in equivalent_forms("10,\\!080")  # a separator, not a list comma
    assert equivalent_forms("\\dfrac{17}{50}")["frac style"] == ["\\frac{17}{50}", "\\tfrac{17}{50}"]
    assert equivalent_forms("90^\\circ")["degrees"] == ["90", "90^{\\circ}", "90 \\text{ degrees}"]
    assert equivalent_forms("5.4 \\text{ cents}")["text units"] == ["5.4"]
    assert equivalent_forms("y = 2x + 3").get("x = ...") is None
    c = changed_answers("(3,4]")
    assert c["swapped ends"] == ["(4,3]"] and c["interval end"] == ["(3,4)"] and c["dropped element"] == ["(3]"]
    assert changed_answers("(-\\infty, 0]")["interval end"] == ["(-\\infty, 0)"]  # the finite end
    assert changed_answers("1 \\pm \\sqrt{19}")["dropped element"] == ["1 + \\sqrt{19}"]
    assert changed_answers("3, 5, 7")["dropped element"] == ["3, 5"]
    assert changed_answers(".0000672")["last digit"] == [".0000673"]
    assert changed_answers("52_8")["last digit"] == ["53_8"]  # the base is not a digit of the answer
    assert gsm8k_equivalent_forms("1000", "How many cookies did she bake?")["word units"] == ["1000 cookies"]
    assert gsm8k_changed_answers("18") == {"plus one": ["19"], "times ten": ["180"], "sign": ["-18"],
                                           "dropped digit": ["1"]}


if __name__ == "__main__":  # print the tables recorded in train/README.md
    sys.exit(pytest.main([__file__, "-q", "-s"]))
