"""Tests for train/eval.py: the pure metrics (unbiased pass@k, majority vote with answer equivalence, summary) and
an end-to-end run of `python -m train.eval` on a tiny checkpoint with a tokenizer."""

import itertools
import json
import math
import os

import pytest
import torch

from train.data import Problem
from train.eval import grade, ks_for, majority_vote, pass_at_k, summarize
from train.rewards import VerifyPool


@pytest.fixture(scope="module")
def pool():
    p = VerifyPool(workers=2, timeout=8.0)
    yield p
    p.close()


def _pass_at_k_brute(n, c, k):
    """Fraction of the k-subsets of n samples (c correct) holding at least one correct one."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n, c, k", [(1, 0, 1), (1, 1, 1), (5, 2, 1), (5, 2, 3), (6, 1, 6), (7, 0, 4), (8, 3, 4)])
def test_pass_at_k_matches_enumeration(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_brute(n, c, k))


def test_pass_at_k_closed_form_and_errors():
    assert pass_at_k(64, 16, 1) == pytest.approx(0.25)
    assert pass_at_k(100, 10, 10) == pytest.approx(1 - math.comb(90, 10) / math.comb(100, 10))
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    assert ks_for(1) == [1] and ks_for(8) == [1, 2, 4, 8] and ks_for(6) == [1, 2, 4, 6]


def test_majority_vote_groups_equivalent_answers(pool):
    def eq(a, b):
        from train.rewards import answers_equal
        return answers_equal(a, b, pool=pool)

    assert majority_vote(["2", "\\frac{1}{2}", "0.5", "2", "1/2"], eq) == "\\frac{1}{2}"  # 3 x one half beats 2 x 2
    assert majority_vote([None, None, "3"], eq) == "3"
    assert majority_vote([None, None]) is None
    assert majority_vote(["4", "5"], eq) == "4"  # tie -> first seen
    assert majority_vote(["1,000", "1000", "7"], eq) == "1,000"


def test_summarize_and_grade(pool):
    problems = [Problem("p1", "\\frac{1}{2}", "a", {"subject": "Algebra", "level": 1}),
                Problem("p2", "7", "b", {"subject": "Geometry", "level": 1})]
    comps = [["\\boxed{0.5}", "\\boxed{1/2}", "\\boxed{2}", "no"], ["\\boxed{6}", "\\boxed{6}", "\\boxed{7}", "#### 7"]]
    records = grade(problems, comps, pool)
    assert records[0]["rewards"] == [1.0, 1.0, 0.0, 0.0] and records[1]["rewards"] == [0.0, 0.0, 1.0, 1.0]
    assert records[0]["voted_correct"] == 1.0
    assert records[1]["voted"] == "6" and records[1]["voted_correct"] == 0.0  # tie 2-2 -> first seen ("6")
    m = summarize(records, 4)
    assert m["num_problems"] == 2 and m["accuracy"] == pytest.approx(0.5)
    assert m["maj@4"] == pytest.approx(0.5)
    assert m["pass@k"]["1"] == pytest.approx(0.5)
    assert m["pass@k"]["4"] == pytest.approx(1.0)
    assert m["per_subject"]["Algebra"] == {"accuracy": 0.5, "num_problems": 1}
    assert m["per_level"]["1"]["num_problems"] == 2
    assert summarize([], 1)["accuracy"] == 0.0


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny MoE checkpoint with a char-level tokenizer (random weights: the test checks the plumbing)."""
    from model import MoEForCausalLM
    from model.presets import preset
    from train.toy import char_tokenizer

    d = str(tmp_path_factory.mktemp("ckpt"))
    torch.manual_seed(0)
    MoEForCausalLM.from_config(preset("tiny", max_position_embeddings=4096)).save_pretrained(d)  # char-level prompts
    char_tokenizer(chat_template=True).save_pretrained(d)
    return d


def test_eval_cli_end_to_end(shared_data, tiny_checkpoint, tmp_path):
    from train.eval import main

    out = str(tmp_path / "m.json")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is far faster on a shared machine
    try:
        _run_eval(main, tiny_checkpoint, shared_data, out)
    finally:
        torch.set_num_threads(threads)


def _run_eval(main, tiny_checkpoint, shared_data, out):
    m = main(["--model", tiny_checkpoint, "--data", os.path.join(shared_data, "math500", "test.jsonl"),
              "--dataset", "math500", "--limit", "3", "--n", "2", "--temperature", "1.0", "--max-tokens", "6",
              "--json", out])
    saved = json.load(open(out))
    assert saved["num_problems"] == 3 and 0.0 <= saved["accuracy"] <= 1.0
    assert set(saved["pass@k"]) == {"1", "2"} and "maj@2" in saved and "per_subject" in saved
    assert len(saved["problems"]) == 3 and len(saved["problems"][0]["rewards"]) == 2
    assert m["accuracy"] == saved["accuracy"]
    m = main(["--model", tiny_checkpoint, "--data", os.path.join(shared_data, "gsm8k", "test.jsonl"),
              "--dataset", "gsm8k", "--limit", "2", "--max-tokens", "4"])
    assert m["num_problems"] == 2 and m["n"] == 1 and m["temperature"] == 0.0
