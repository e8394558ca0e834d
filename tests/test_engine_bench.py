"""bench/throughput.py and the CLI run end to end on CPU with the tiny preset (small workloads, short baseline)."""

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


def load_bench():
    spec = importlib.util.spec_from_file_location("throughput", os.path.join(ROOT, "bench", "throughput.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["throughput"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_throughput_bench_cpu(tmp_path, capsys):
    bench = load_bench()
    path = tmp_path / "tp.json"
    res = bench.main(["--preset", "tiny", "--device", "cpu", "--quick", "--workloads", "a,c,d",
                      "--baseline-seconds", "1", "--json", str(path)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(path.read_text()) == json.loads(json.dumps(res))
    names = [w["name"] for w in res["workloads"]]
    assert names == ["a_batch1_decode", "c_grpo_rollout", "d_long_context"]
    for w in res["workloads"]:
        assert w["output_tokens"] == w["wanted_tokens"] > 0 and w["tokens_per_s"] > 0
        assert 0 < w["roofline_fraction"] < 1 and w["baseline_tokens_per_s"] > 0
    assert res["workloads"][1]["samples"] == 16


def test_cli_token_ids(capsys):
    from model.engine.cli import main

    assert main(["--preset", "tiny", "--ids", "5,6,7", "--n", "2", "--temperature", "1", "--seed", "3",
                 "--max-tokens", "6", "--num-blocks", "16", "--block-size", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[0]") and lines[1].startswith("[1]")
