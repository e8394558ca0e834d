"""The trainer's prompt path (train/grpo.py + train/config.py): the same prompt function and styles as evaluation,
one BOS in the prompts the engine receives with a DeepSeek-style tokenizer, and problems whose prompt exceeds
max_prompt_length skipped with a logged count instead of a crash."""

import json

import pytest
import torch
from tiny_tokenizers import deepseek_style_tokenizer

import train.grpo as grpo
from train.config import GRPOConfig, parse_config
from train.data import prompt_ids

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tmp_path, data, monkeypatch, **kw):
    """One GRPO step of a random tiny model; returns the prompts the engine was given and the metrics."""
    sent = []
    sample = grpo.sample

    def recording_sample(llm, prompts, cfg, step, first_index):
        sent.extend(prompts)
        return sample(llm, prompts, cfg, step, first_index)

    monkeypatch.setattr(grpo, "sample", recording_sample)
    args = {"config": "toy", "out": str(tmp_path / "run"), "data": str(data), "dataset": "custom", "steps": 1,
            "warmstart_steps": 0, "problems_per_step": 2, "group_size": 2, "max_tokens": 4, "beta": 0.0,
            "save_every": 0, "model_overrides": json.dumps({"max_position_embeddings": 512}), **kw}
    cfg = parse_config([x for k, v in args.items() for x in ("--" + k.replace("_", "-"), str(v))])
    return sent, grpo.run(cfg)


def _jsonl(path, problems):
    path.write_text("".join(json.dumps({"problem": p, "answer": "2"}) + "\n" for p in problems))
    return path


def test_long_prompts_are_skipped_with_a_logged_count(tmp_path, monkeypatch, capsys):
    data = _jsonl(tmp_path / "p.jsonl", ["1+1=", "2+0=", "What is " + "one plus one " * 20 + "?", "0+2="])
    sent, metrics = _run(tmp_path, data, monkeypatch, prompt="raw", max_prompt_length=10)
    assert len(metrics) == 1 and all(len(p) <= 10 for p in sent) and len(sent) == 2
    info = json.load(open(tmp_path / "run" / "prompts.json"))
    assert info["skipped_long_prompts"] == 1 and info["problems"] == 4 and info["longest_prompt"] > 200
    assert "skipped 1 of 4 problems" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_prompt_length: every prompt"):
        _run(tmp_path / "all", data, monkeypatch, prompt="raw", max_prompt_length=2)


def test_training_prompts_hold_one_bos_with_a_deepseek_style_tokenizer(tmp_path, monkeypatch):
    tok_dir = tmp_path / "tok"
    deepseek_style_tokenizer().save_pretrained(tok_dir)
    data = _jsonl(tmp_path / "p.jsonl", ["1+1=", "2+0="])
    sent, _ = _run(tmp_path, data, monkeypatch, tokenizer=str(tok_dir), prompt="chat")
    tok = deepseek_style_tokenizer()
    assert len(sent) == 2
    for ids in sent:
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert sorted(sent) == sorted(prompt_ids(p, tok, "chat") for p in ("1+1=", "2+0="))  # eval's function


def test_prompt_options_are_validated():
    with pytest.raises(ValueError, match="prompt"):
        parse_config(["--prompt", "alpaca"])
    with pytest.raises(ValueError, match="chat_template_kwargs"):
        parse_config(["--chat-template-kwargs", "[1]"])
    with pytest.raises(ValueError, match="max_prompt_length"):
        parse_config(["--max-prompt-length", "0"])
    with pytest.raises(ValueError, match="fewshot"):
        parse_config(["--fewshot", "mmlu"])
    cfg = parse_config(["--prompt", "qwen-math", "--chat-template-kwargs", '{"enable_thinking": false}'])
    assert cfg.template_kwargs() == {"enable_thinking": False} and GRPOConfig().max_prompt_length == 1024
    assert torch.get_num_threads() == 1  # the module's one_thread fixture is active
