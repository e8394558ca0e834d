"""Tensor and expert parallelism on CPU: `torchrun --nproc-per-node 2` and `4` with gloo, greedy generation of a tiny
DeepSeek-V3 model (fp32, and FP8 weight-only and W8A8; and a tiny Qwen3-MoE, GQA) with `LLM(path,
tensor_parallel_size=N, enable_expert_parallel=...)` gives the same tokens as one process: experts exchanged with
variable-size all-to-all, with the fixed-shape all-gather dispatch (the CUDA-graph path), with experts split by channel
instead, and with data-parallel attention (3 prompts over N ranks: with 4, one rank has none and only joins the MoE
exchanges); uneven loads (every token routed to rank 0's experts) and empty ranks (one sequence: at decode the other
ranks have no token); each rank holds only its slices. Bad world sizes are refused by name before any weight."""

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_models import make_model

from model import LLM, MoEForCausalLM, SamplingParams
from model.parallel import ParallelConfig, check_parallel
from model.presets import preset
from model.quantize import quantize_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0",
       "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python"), os.environ.get("PYTHONPATH", "")])}
PROMPTS = {"many": [[3, 17, 29, 5, 77, 8, 9], [9, 8, 7], [100, 2, 64, 64, 1, 5, 6, 7, 8, 10, 11]],
           "one": [[42, 7, 19]]}
# FP8 splits on 128-row blocks: heads x head dims per rank must be multiples of 128 for N = 2 and 4
FP8_SHAPES = {"num_attention_heads": 8, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
              "intermediate_size": 512}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp")
    make_model("tiny-v3").save_pretrained(str(d / "fp32"))
    skewed = make_model("tiny-v3")
    for layer in skewed.model.layers:  # V3's selection bias: experts 0 and 1 (rank 0's) win every token
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.e_score_correction_bias[:2] += 10.0
    skewed.save_pretrained(str(d / "skewed"))
    make_model("tiny-v3", **FP8_SHAPES).save_pretrained(str(d / "wide"))
    quantize_checkpoint(str(d / "wide"), str(d / "fp8"))
    make_model("tiny-qwen3").save_pretrained(str(d / "qwen3"))
    return {k: str(d / k) for k in ("fp32", "skewed", "wide", "fp8", "qwen3")}


def single_process(ckpt: str, prompts: str, monkeypatch, act: str = "native", max_tokens: int = 6):
    monkeypatch.setenv("DSMATH_FP8_ACT", act)
    llm = LLM(ckpt, num_blocks=32, block_size=8, device="cpu")
    outs = llm.generate(PROMPTS[prompts], SamplingParams(max_tokens=max_tokens, temperature=0.0, return_routing=True),
                        use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], [o.outputs[0].routing.tolist() for o in outs]


def torchrun(n: int, scenarios: list[str], out: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
           os.path.join(ROOT, "tests", "parallel_worker.py"), "--out", out, *scenarios]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return json.load(open(out))


@pytest.mark.parametrize("n", [2, 4])
def test_generation_matches_one_process(ckpts, n, tmp_path, monkeypatch):
    c = ckpts
    scen = {  # name: (checkpoint, expert parallel, dispatch, prompts, activations, data-parallel attention)
        "ep_a2a": ("fp32", 1, "all_to_all", "many", "native", 0),
        "ep_gather": ("fp32", 1, "all_gather", "many", "native", 0),
        "moe_tp": ("fp32", 0, "auto", "many", "native", 0),
        "skewed_one": ("skewed", 1, "all_to_all", "one", "native", 0),
        "dp_attn": ("fp32", 1, "all_to_all", "many", "native", 1),
        "dp_attn_skewed": ("skewed", 1, "all_to_all", "many", "native", 1),
        "fp8_ep": ("fp8", 1, "all_to_all", "many", "native", 0),
        "fp8_w8a8": ("fp8", 1, "all_to_all", "many", "fp8", 0),
        "fp8_dp_w8a8": ("fp8", 1, "all_to_all", "many", "fp8", 1),
        "qwen3_gqa": ("qwen3", 1, "all_to_all", "many", "native", 0),  # KV heads split: each rank caches its own
    }
    if n == 4:  # keep the 4-rank run short (2 idle cores): the layouts most likely to break with more ranks
        scen = {k: v for k, v in scen.items() if k in ("ep_a2a", "skewed_one", "dp_attn", "fp8_ep")}
    got = torchrun(n, [f"{k}={c[v[0]]}:" + ":".join(map(str, v[1:])) for k, v in scen.items()],
                   str(tmp_path / "out.json"))
    refs = {}
    for name, (ck, _ep, _d, prompts, act, _dp) in scen.items():
        key = (ck, prompts, act)
        if key not in refs:
            refs[key] = single_process(c[ck], prompts, monkeypatch, act)
        assert got[name]["tokens"] == refs[key][0], name
        assert got[name]["routing"] == refs[key][1], name  # every token's experts, recorded on every rank
    one = MoEForCausalLM.from_pretrained(c["fp32"])
    full = sum(p.numel() * p.element_size() for p in one.parameters())
    sizes = got["ep_a2a"]["param_bytes"]
    assert len(set(sizes)) == 1 and sizes[0] < full * (0.75 if n == 2 else 0.55)  # each rank holds its slices
    assert got["fp8_ep"]["fp8_params"] > 0


def test_skewed_checkpoint_routes_everything_to_rank0(ckpts):
    """The uneven-load scenario really is uneven: every pair of every token goes to experts 0 and 1."""
    m = MoEForCausalLM.from_pretrained(ckpts["skewed"])
    x = torch.randn(64, m.config.hidden_size)
    for layer in m.model.layers:
        if hasattr(layer.mlp, "gate"):
            _w, ids = layer.mlp.gate(x)
            assert set(ids.flatten().tolist()) == {0, 1}


def test_bad_world_sizes_refused_before_loading(ckpts, monkeypatch):
    cfg = preset("tiny-v3")
    with pytest.raises(ValueError, match="num_attention_heads: 4 heads do not split across 3 ranks"):
        check_parallel(cfg, 3, True)
    with pytest.raises(ValueError, match="n_routed_experts: 8 experts do not split across 16 ranks"):
        check_parallel(preset("tiny-v3", num_attention_heads=16, intermediate_size=128, vocab_size=256), 16, True)
    with pytest.raises(ValueError, match="moe_intermediate_size: 32 channels do not split across 64 ranks"):
        check_parallel(preset("tiny-v3", num_attention_heads=64, intermediate_size=128, vocab_size=256), 64, False)
    fp8 = preset("tiny-v3", quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    with pytest.raises(ValueError, match="128-row FP8 block"):
        check_parallel(fp8, 2, True)  # 2 heads x 24 = 48 rows of q_b_proj per rank

    def boom(*a, **k):
        raise AssertionError("weights were materialised before the parallel layout was checked")
    monkeypatch.setattr(torch.nn.Module, "to_empty", boom)
    with pytest.raises(ValueError, match="num_attention_heads"):
        MoEForCausalLM.from_pretrained(ckpts["fp32"], parallel=ParallelConfig(world=3, rank=0, expert_parallel=True))
    with pytest.raises(ValueError, match="FP8 block"):
        MoEForCausalLM.from_pretrained(ckpts["fp8"], parallel=ParallelConfig(world=8, rank=0, expert_parallel=True))


def test_tensor_parallel_needs_torchrun(ckpts):
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node 2"):
        LLM(ckpts["fp32"], tensor_parallel_size=2, device="cpu")


def test_serve_tensor_parallel(tmp_path, monkeypatch):
    """`dsmath serve` under torchrun with 2 ranks (tensor + expert parallel, gloo): rank 0 answers HTTP, rank 1
    replays its steps; a seeded sampled completion (n = 2) and a greedy one equal one process's LLM.generate."""
    for mod in ("fastapi", "uvicorn", "httpx"):
        pytest.importorskip(mod)
    import socket
    import time

    import httpx

    from train.toy import save_toy_checkpoint

    ckpt = save_toy_checkpoint(str(tmp_path / "toy"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "serve.log", "w")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "model.serve.cli", "--model", ckpt, "--port", str(port), "--tensor-parallel-size", "2",
           "--enable-expert-parallel", "--num-blocks", "64", "--block-size", "16", "--threads", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, open(tmp_path / "serve.log").read()[-4000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, open(tmp_path / "serve.log").read()[-4000:]
            time.sleep(0.3)
        got = []
        for kw in ({"temperature": 0.0, "n": 1}, {"temperature": 1.0, "seed": 7, "n": 2}):
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                           json={"model": "toy", "prompt": "3+4=", "max_tokens": 8, **kw})
            assert r.status_code == 200, r.text
            got.append([c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])])
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    llm = LLM(ckpt, num_blocks=64, block_size=16, device="cpu")
    want = [[o.text for o in llm.generate("3+4=", SamplingParams(max_tokens=8, **kw), use_tqdm=False)[0].outputs]
            for kw in ({"temperature": 0.0, "n": 1}, {"temperature": 1.0, "seed": 7, "n": 2})]
    assert got == want


def test_serve_keeps_a_parallel_engine_in_process():
    """Under tensor / expert parallelism rank 0's engine steps in the process of its process group: `auto` does not
    split it off, and `--engine-process yes` is refused with a message naming the flags."""
    from model.serve.cli import parse, use_engine_process

    assert not use_engine_process(parse(["--model", "m", "--tensor-parallel-size", "2"]))
    assert not use_engine_process(parse(["--model", "m", "--enable-expert-parallel"]))
    with pytest.raises(SystemExit, match="--engine-process yes.*--tensor-parallel-size"):
        use_engine_process(parse(["--model", "m", "--enable-expert-parallel", "--engine-process", "yes"]))
