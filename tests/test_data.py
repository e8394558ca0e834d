"""Tests for train/data.py: the four real JSONL layouts, a user's own JSONL, prompts, and the resumable sampler."""

import json
import os

import pytest

from train.data import INSTRUCTION, Problem, ProblemSampler, build_prompt, gsm8k_final, load_problems
from train.toy import char_tokenizer


def _path(shared_data, name):
    return os.path.join(shared_data, name, "test.jsonl")


def test_math500(shared_data):
    ps = load_problems(_path(shared_data, "math500"), "math500")
    assert len(ps) == 500
    assert ps[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)" and ps[0].id == "test/precalculus/807.json"
    assert ps[0].meta == {"subject": "Precalculus", "level": 2}
    assert {p.meta["level"] for p in ps} == {1, 2, 3, 4, 5}


def test_aime_amc_gsm8k(shared_data):
    aime = load_problems(_path(shared_data, "aime24"), "aime24")
    assert len(aime) == 30 and "025" in {p.answer for p in aime}  # zero-padded kept; the reward compares numbers
    amc = load_problems(_path(shared_data, "amc23"), "amc23")
    assert len(amc) == 40 and amc[0].answer == "27"  # 27.0 -> "27"
    gsm = load_problems(_path(shared_data, "gsm8k"), "gsm8k")
    assert len(gsm) == 1319 and gsm[0].answer == "18" and gsm[0].problem.startswith("Janet")
    assert all("," not in p.answer for p in gsm)
    assert len(load_problems(_path(shared_data, "gsm8k"), "gsm8k", limit=7)) == 7


def test_gsm8k_final():
    assert gsm8k_final("so 1,000 + 1 = <<1000+1=1001>>1,001\n#### 1,001") == "1001"
    with pytest.raises(ValueError, match="####"):
        gsm8k_final("no final line")


def test_custom_jsonl(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text(json.dumps({"q": "1+1?", "a": 2}) + "\n\n" + json.dumps({"q": "x?", "a": "\\frac12"}) + "\n")
    ps = load_problems(str(f), "custom", problem_key="q", answer_key="a")
    assert [(p.problem, p.answer) for p in ps] == [("1+1?", "2"), ("x?", "\\frac12")]
    with pytest.raises(KeyError, match="problem_key"):
        load_problems(str(f))
    with pytest.raises(ValueError, match="dataset"):
        load_problems(str(f), "mnist")


def test_prompts():
    plain = build_prompt("What is 1+1?")
    assert "What is 1+1?" in plain and INSTRUCTION in plain and plain.endswith("Solution:")
    assert build_prompt("q", char_tokenizer()) == build_prompt("q")  # no chat template -> plain
    chat = build_prompt("What is 1+1?", char_tokenizer(chat_template=True), system="Be brief.")
    assert chat == f"<system>Be brief.\n<user>What is 1+1?\n{INSTRUCTION}\n<assistant>"


def test_sampler_deterministic_epochs_and_resume():
    items = [Problem(str(i), str(i)) for i in range(10)]
    s = ProblemSampler(items, seed=3)
    first = [p.problem for p in s.next(10)]
    assert sorted(first) == [str(i) for i in range(10)]  # one epoch = a permutation
    second = [p.problem for p in s.next(10)]
    assert sorted(second) == sorted(first) and second != first  # a new shuffle each epoch
    assert [p.problem for p in ProblemSampler(items, seed=3).next(10)] == first

    a = ProblemSampler(items, seed=1)
    a.next(7)
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON round trip (checkpoints)
    rest = [p.problem for p in a.next(25)]
    b = ProblemSampler(items, seed=1)
    b.load_state_dict(state)
    assert [p.problem for p in b.next(25)] == rest
    with pytest.raises(ValueError, match="empty"):
        ProblemSampler([])
