"""Tests for train/data.py: the four real JSONL layouts, a user's own JSONL, prompts (one BOS with a DeepSeek-style
tokenizer, none with a Qwen-style one, every style, the few-shot exemplar sets), and the resumable sampler."""

import json
import os

import pytest
from tiny_tokenizers import DS_BOS, deepseek_style_tokenizer, qwen_style_tokenizer

from train.data import (
    INSTRUCTION,
    PROMPT_STYLES,
    Problem,
    ProblemSampler,
    fewshot_set,
    gsm8k_final,
    load_problems,
    prompt_ids,
    prompt_text,
    resolve_style,
    style_stop,
)
from train.rewards import extract_answer
from train.toy import char_tokenizer


def _path(shared_data, name):
    return os.path.join(shared_data, name, "test.jsonl")


def test_math500(shared_data):
    ps = load_problems(_path(shared_data, "math500"), "math500")
    assert len(ps) == 500
    assert ps[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)" and ps[0].id == "test/precalculus/807.json"
    assert ps[0].meta == {"subject": "Precalculus", "level": 2}
    assert [p.index for p in ps[:3]] == [0, 1, 2]  # the line number: evaluation seeds derive from it
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


def _ids(out):
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def test_deepseek_style_tokenizer_one_bos_in_every_style():
    tok = deepseek_style_tokenizer()
    bos = tok.bos_token_id
    msgs = [{"role": "user", "content": f"What is 1+1?\n{INSTRUCTION}"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.startswith(DS_BOS) and tok.encode(text).count(bos) == 2  # the bug: template BOS + tokenizer BOS
    for style in PROMPT_STYLES:
        ids = prompt_ids("What is 1+1?", tok, style)
        assert ids.count(bos) == 1 and ids[0] == bos, style
    # the chat path is apply_chat_template(tokenize=True)'s
    assert prompt_ids("What is 1+1?", tok, "chat") == _ids(
        tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True))


def test_qwen_style_tokenizer_no_bos_and_the_styles():
    tok = qwen_style_tokenizer()
    text = lambda style, **kw: tok.decode(prompt_ids("What is 1+1?", tok, style, **kw))  # noqa: E731
    assert text("chat") == (f"<|im_start|>user\nWhat is 1+1?\n{INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n")
    assert text("chat", system="Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert text("qwen-math") == (f"<|im_start|>system\n{INSTRUCTION}<|im_end|>\n"
                                 "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n")
    assert text("deepseek-r1") == text("chat")  # no system prompt, the instruction in the user turn
    assert text("chat", chat_template_kwargs={"enable_thinking": False}).endswith("<think>\n\n</think>\n\n")
    assert text("plain") == f"Problem: What is 1+1?\n{INSTRUCTION}\nSolution:"
    assert resolve_style("auto", tok) == "chat" and resolve_style("auto", char_tokenizer()) == "plain"


def test_prompt_errors_name_the_argument():
    tok = qwen_style_tokenizer()
    for style in ("qwen-math", "deepseek-r1", "few-shot", "raw"):
        with pytest.raises(ValueError, match="system"):
            prompt_ids("q", tok, style, system="Be brief.")
    with pytest.raises(ValueError, match="style.*chat template"):
        prompt_ids("q", char_tokenizer(), "chat")  # a base model's tokenizer: no silent fallback to plain
    with pytest.raises(ValueError, match="style: unknown"):
        prompt_ids("q", tok, "alpaca")
    with pytest.raises(ValueError, match="chat_template_kwargs"):
        prompt_ids("q", tok, "plain", chat_template_kwargs={"enable_thinking": False})
    with pytest.raises(TypeError, match="problem"):
        prompt_ids(None, tok, "chat")
    with pytest.raises(ValueError, match="fewshot"):
        fewshot_set("mmlu")


def test_text_styles_and_the_toy_prompt_unchanged():
    tok = char_tokenizer()
    assert prompt_ids("3+4=", tok, "raw") == tok.encode("3+4=")  # the toy task's prompt ids, as before
    assert prompt_text("q", "plain", system="Be brief.") == f"Be brief.\n\nProblem: q\n{INSTRUCTION}\nSolution:"
    assert style_stop("chat") == [] and style_stop("few-shot", "gsm8k-cot") == ["Q:"]


@pytest.mark.parametrize("name, shots, query", [("minerva-math", 4, "Problem:\nWhat is 1+1?\n\nSolution:"),
                                                ("gsm8k-cot", 8, "Q: What is 1+1?\nA:")])
def test_fewshot_sets(name, shots, query):
    fs = fewshot_set(name)
    assert len(fs["exemplars"]) == shots and ("Lewkowycz" in fs["source"] or "Wei et al" in fs["source"])
    text = prompt_text("What is 1+1?", "few-shot", fewshot=name)
    assert text.endswith(fs["separator"] + query)
    for ex in fs["exemplars"]:  # each worked solution states its own answer the way the grader reads it
        assert extract_answer(fs["format"].format(**ex)) == ex["answer"], ex["problem"][:40]
    tok = deepseek_style_tokenizer()
    assert prompt_ids("What is 1+1?", tok, "few-shot", fewshot=name).count(tok.bos_token_id) == 1


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
