"""`python -m model.plan`: the DeepSeek-V3 (671B, FP8) plan on 8 GPUs sums to the right bytes (checked against a
count written out here), the KV-cache capacity follows from them, the decode-time model behaves (more context or
batch costs more; data-parallel attention caches 8x more sequences), any config.json works, bad layouts are
refused by name."""

import json
import os
import subprocess
import sys

import pytest

from model.config import ModelConfig
from model.plan import V3, Hardware, main, plan
from model.presets import preset_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30


def test_v3_on_8_h200():
    p = plan(ModelConfig.from_dict(dict(V3)), 8, True, 131072)
    experts = 58 * 256 * 3 * (2048 * 7168 + 16 * 56 * 4) / 8  # 58 MoE layers, FP8 + one fp32 scale per block
    assert p["per_rank_gib"]["routed_experts"] == pytest.approx(experts / GIB)
    assert 600 < p["weights_total_gib"] < 640  # 671B parameters, FP8 (embedding and head in bf16)
    assert 80 < p["weights_rank_gib"] < 86
    assert p["kv_bytes_per_token"] == 61 * 576 * 2  # latent [c; k_pe] per layer, bf16
    hw = Hardware()
    free = hw.hbm_gib * hw.utilisation - hw.reserve_gib - p["weights_rank_gib"]
    assert p["kv_tokens_tp_attention"] == pytest.approx(free * GIB / (61 * 576 * 2))
    assert 3 < p["seqs_at_context_tp_attention"] < 6  # heads split: the latent cache is replicated on every rank
    assert p["seqs_at_context_dp_attention"] > 5 * p["seqs_at_context_tp_attention"]
    fp8kv = plan(ModelConfig.from_dict(dict(V3)), 8, True, 131072, kv_dtype="fp8")
    assert fp8kv["kv_tokens_tp_attention"] == pytest.approx(2 * p["kv_tokens_tp_attention"], rel=0.01)
    steps = [r["tp_attention"]["step_ms"] for r in p["decode"]]
    assert steps == sorted(steps)
    short = plan(ModelConfig.from_dict(dict(V3)), 8, True, 4096)
    assert short["decode"][2]["tp_attention"]["step_ms"] < p["decode"][2]["tp_attention"]["step_ms"]


def test_cli_prints_the_plan(tmp_path):
    r = subprocess.run([sys.executable, "-m", "model.plan", "--model", "v3", "--tp", "8", "--ep"], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT + "/python"})
    assert r.returncode == 0, r.stderr
    assert "routed_experts" in r.stdout and "sequences of 131072" in r.stdout and "tok/s" in r.stdout
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(preset_dict("tiny-v3")))
    main(["--model", str(cfg), "--tp", "2", "--ep", "--json"])


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="num_attention_heads: 128 heads do not split across 7 ranks"):
        main(["--model", "v3", "--tp", "7", "--ep"])
    with pytest.raises(ValueError, match="intermediate_size: 576 channels per rank .* 128-row FP8 block"):
        main(["--model", "v3", "--tp", "32", "--ep"])  # the dense MLPs' 18432 / 32 rows split an FP8 block
