"""Tests for train/eval.py: the pure metrics (unbiased pass@k, majority vote with answer equivalence, summary), the
per-problem seeds, and end-to-end runs of `python -m train.eval` on a tiny checkpoint: pass@1/pass@4/maj@4 in the
JSON, the same numbers when run twice, the same per-problem samples whatever --limit puts in the run, one BOS in
the prompt a DeepSeek-style tokenizer receives, per-sample records."""

import itertools
import json
import math
import os

import pytest
import torch

from train.data import Problem
from train.eval import grade, ks_for, majority_vote, pass_at_k, problem_seed, summarize
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
    assert records[0]["reasons"] == ["correct", "correct", "wrong", "no answer"]
    assert records[0]["answers"] == ["0.5", "1/2", "2", None] and records[0]["gold_parsed"] is True
    assert records[0]["voted_correct"] == 1.0
    assert records[1]["voted"] == "6" and records[1]["voted_correct"] == 0.0  # tie 2-2 -> first seen ("6")
    m = summarize(records, 4)
    assert m["num_problems"] == 2 and m["accuracy"] == pytest.approx(0.5) and m["pass@1"] == m["accuracy"]
    assert m["maj@4"] == pytest.approx(0.5)
    assert m["pass@2"] == pytest.approx((pass_at_k(4, 2, 2) + pass_at_k(4, 2, 2)) / 2)
    assert m["pass@4"] == pytest.approx(1.0)
    assert m["reasons"] == {"correct": 4, "wrong": 3, "no answer": 1} and m["unparsed_gold"] == 0
    assert m["per_subject"]["Algebra"] == {"accuracy": 0.5, "num_problems": 1}
    assert m["per_level"]["1"]["num_problems"] == 2
    assert summarize([], 1)["accuracy"] == 0.0


def test_unparsed_gold_is_counted(pool):
    records = grade([Problem("p", "\\frac{", "a"), Problem("q", "3", "b")], [["#### \\frac {"], ["#### 3"]], pool)
    assert [r["rewards"] for r in records] == [[1.0], [1.0]]
    assert summarize(records, 1)["unparsed_gold"] == 1


def test_generate_seeds_each_problem_from_its_line():
    """The engine request of each problem carries the seed of (seed, line index), not one shared seed."""
    from types import SimpleNamespace

    from train.eval import generate

    seen = []

    class FakeLLM:
        def generate(self, prompts, params):
            seen.extend(params)
            return [SimpleNamespace(outputs=[SimpleNamespace(text="x")] * p.n) for p in params]

    problems = [Problem("a", "1", index=7), Problem("b", "2", index=3), Problem("c", "3")]
    out = generate(FakeLLM(), [[1], [2], [3]], problems, n=2, temperature=0.6, max_tokens=4, seed=5, stop=["Q:"])
    assert out == [["x", "x"]] * 3
    assert [p.seed for p in seen] == [problem_seed(5, 7), problem_seed(5, 3), problem_seed(5, 2)]
    assert all(p.stop_list == ["Q:"] and p.n == 2 for p in seen)


def test_problem_seeds_differ_per_problem_and_are_stable():
    seeds = [problem_seed(0, i) for i in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert problem_seed(0, 7) == problem_seed(0, 7) != problem_seed(1, 7)


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


@pytest.fixture(scope="module")
def deepseek_tokenizer_dir(tmp_path_factory):
    from tiny_tokenizers import deepseek_style_tokenizer

    d = str(tmp_path_factory.mktemp("ds_tok"))
    deepseek_style_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def one_thread_here():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is far faster on a shared machine
    yield
    torch.set_num_threads(threads)


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_eval_cli_n4_reproducible_and_independent_of_limit(shared_data, tiny_checkpoint, tmp_path, one_thread_here):
    from train.eval import main

    data = os.path.join(shared_data, "math500", "test.jsonl")

    def run(limit, tag):
        out, rec = str(tmp_path / f"{tag}.json"), str(tmp_path / f"{tag}.jsonl")
        m = main(["--model", tiny_checkpoint, "--data", data, "--dataset", "math500", "--limit", str(limit),
                  "--n", "4", "--temperature", "1.0", "--max-tokens", "6", "--json", out, "--records", rec])
        return m, json.load(open(out)), _records(rec)

    m, saved, recs = run(3, "a")
    for key in ("pass@1", "pass@2", "pass@4", "maj@4", "accuracy", "unparsed_gold"):
        assert key in saved, key
    assert saved["pass@1"] == saved["accuracy"] == m["accuracy"] and saved["num_problems"] == 3
    assert "per_subject" in saved and len(saved["problems"]) == 3 and len(saved["problems"][0]["rewards"]) == 4
    assert len(recs) == 12 and set(recs[0]) == {"problem_id", "sample", "prompt_sha256", "completion", "answer",
                                                "reward", "reason"}
    assert [r["sample"] for r in recs[:4]] == [0, 1, 2, 3]
    assert all(r["reason"] == "no answer" for r in recs if r["answer"] is None)
    assert len({r["completion"] for r in recs}) > 6  # samples differ (per-problem, per-sample streams)

    m2, saved2, recs2 = run(3, "b")  # the same run again: the same numbers, the same samples
    drop = ("generate_s", "grade_s")
    assert {k: v for k, v in saved.items() if k not in drop} == {k: v for k, v in saved2.items() if k not in drop}
    assert recs2 == recs

    _, saved5, recs5 = run(5, "c")  # more problems in the batch: the first three draw exactly what they drew
    assert recs5[:12] == recs and saved5["problems"][:3] == saved["problems"]


def test_eval_deepseek_tokenizer_one_bos_and_styles(shared_data, tiny_checkpoint, deepseek_tokenizer_dir, tmp_path,
                                                     capsys, one_thread_here):
    from tiny_tokenizers import DS_BOS
    from transformers import AutoTokenizer

    from train.data import load_problems, prompt_ids
    from train.eval import main, prompt_sha256

    data = os.path.join(shared_data, "math500", "test.jsonl")
    rec = str(tmp_path / "r.jsonl")
    m = main(["--model", tiny_checkpoint, "--tokenizer", deepseek_tokenizer_dir, "--data", data, "--dataset",
              "math500", "--limit", "2", "--prompt-style", "deepseek-r1", "--max-tokens", "4", "--show-prompt",
              "--records", rec])
    shown = capsys.readouterr().out
    assert shown.count(DS_BOS) == 1 and "prompt style: deepseek-r1" in shown
    assert m["temperature"] == 0.6 and m["top_p"] == 0.95  # the style's sampling defaults
    tok = AutoTokenizer.from_pretrained(deepseek_tokenizer_dir)  # what the engine loaded
    p = load_problems(data, "math500", limit=1)[0]
    ids = prompt_ids(p.problem, tok, "deepseek-r1")
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert _records(rec)[0]["prompt_sha256"] == prompt_sha256(ids)  # the records name the prompt actually sent


def test_eval_gsm8k_greedy_and_few_shot(shared_data, tiny_checkpoint, capsys, one_thread_here):
    from train.eval import main

    data = os.path.join(shared_data, "gsm8k", "test.jsonl")
    m = main(["--model", tiny_checkpoint, "--data", data, "--dataset", "gsm8k", "--limit", "2", "--max-tokens", "4"])
    assert m["num_problems"] == 2 and m["n"] == 1 and m["temperature"] == 0.0 and "pass@1" in m
    m = main(["--model", tiny_checkpoint, "--data", data, "--dataset", "gsm8k", "--limit", "1", "--max-tokens", "4",
              "--prompt-style", "few-shot", "--show-prompt"])
    shown = capsys.readouterr().out
    assert m["fewshot"] == "gsm8k-cot" and shown.count("Q: ") == 9 and "The answer is 6." in shown
    with pytest.raises(SystemExit):
        main(["--model", tiny_checkpoint, "--data", data, "--dataset", "gsm8k", "--limit", "1", "--prompt-style",
              "qwen-math", "--system", "Be brief."])
    assert "--system: the qwen-math style takes no system prompt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", tiny_checkpoint, "--data", data, "--dataset", "gsm8k", "--chat-template-kwargs", "[1]"])
