"""The GRPO loop learns (a shortened CI version of `python -m train.grpo --config toy`): a tiny MoE, warm-started
on the answer FORMAT only (random digits), must raise its mean reward on two arithmetic problems by >= 0.25 in 15
steps from the reward alone. The full toy run (26 problems, 150 steps) is in the README / the report."""

import json

from train.config import parse_config
from train.grpo import run


def test_toy_reward_rises(tmp_path):
    data = tmp_path / "two.jsonl"
    data.write_text(json.dumps({"problem": "2+2=", "answer": "4"}) + "\n"
                    + json.dumps({"problem": "3-1=", "answer": "2"}) + "\n")
    cfg = parse_config(["--config", "toy", "--out", str(tmp_path / "run"), "--data", str(data), "--steps", "15",
                        "--problems-per-step", "2", "--group-size", "16", "--lr", "3e-3", "--save-every", "0"])
    hist = run(cfg)
    r = [m["reward_mean"] for m in hist]
    first, last = sum(r[:3]) / 3, sum(r[-3:]) / 3
    print("reward per step:", [round(x, 3) for x in r])
    assert first < 0.3  # chance level after the format-only warm start (1 in 10 digits)
    assert last - first >= 0.25, r
    assert all(m["resp_len"] < 8 for m in hist)  # still answering "\boxed{d}" and stopping
