"""Headline generation benchmark (issue 7): the engine (model.engine.LLM) vs transformers' `generate`.

Workloads (defaults on CUDA; `--preset tiny --device cpu` runs all four small on a CPU, `--quick` likewise):
  a  batch-1 decode: one 128-token prompt, 512 new tokens (tokens/s per user)
  b  offline throughput: 256 requests, prompt and output lengths uniform in [100, 1024], ignore_eos
     (nano-vllm's protocol), temperature 1
  c  GRPO rollout: 32 prompts x 16 samples (n=16, prompt prefilled once), 256-token prompts, 1024 new tokens
  d  long context: one 128K-token prompt (capped to max_model_len), 256 new tokens (chunked prefill)
tokens/s counts generated tokens over the workload's wall time (prefill included). The roofline fraction is
sum over engine steps of max(bytes read / measured copy bandwidth, flops / measured matmul peak) divided by the
measured time; bytes = dense weights + routed experts touched (expected distinct experts E(1-(1-K/E)^T) for T
tokens) + KV cache read + embedding rows; flops = 2 x active parameters x tokens + attention (q x kv pairs).
The baseline is the same workload through transformers' generate on the same weights (batched, left padded,
greedy or sampled like ours), stopped after --baseline-seconds (a StoppingCriteria) and scaled by the tokens it
finished; skipped with --no-baseline, and for prompts over --hf-max-prompt tokens.

Usage: python bench/throughput.py [--preset v2-lite|tiny|... | --model DIR] [--device cuda|cpu] [--quick]
                                  [--workloads a,b,c,d] [--no-baseline] [--no-cascade] [--json PATH]
                                  [--override KEY=VALUE ...] [--rollout-samples N] [--rollout-prompt-len P]
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

if __package__ and "." in __package__:  # `dsmath bench`: dsmath.bench.throughput in the installed distribution
    from .. import model as model_pkg
    from ._util import device_name, print_json, print_table
else:  # `python bench/throughput.py` (or `bench.throughput`) from the repo
    ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, ROOT)
    from _util import device_name, print_json, print_table

    import model as model_pkg

LLM, SamplingParams = model_pkg.LLM, model_pkg.SamplingParams


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    params: list[SamplingParams]
    hf_sample: bool


# ---------------------------------------------------------------------------------------------- workloads
def sizes(args, max_len: int) -> dict:
    small = args.quick or args.device == "cpu"
    s = dict(a=(16, 32), b=(16, 8, 64), c=(4, 4, 32, 48), d=(1024, 32)) if small else \
        dict(a=(128, 512), b=(256, 100, 1024), c=(32, 16, 256, 1024), d=(131072, 256))
    if args.requests:
        s["b"] = (args.requests, *s["b"][1:])
    if args.rollout_prompts:
        s["c"] = (args.rollout_prompts, *s["c"][1:])
    if args.rollout_tokens:
        s["c"] = (*s["c"][:3], args.rollout_tokens)
    if args.rollout_samples:
        s["c"] = (s["c"][0], args.rollout_samples, *s["c"][2:])
    if args.rollout_prompt_len:
        s["c"] = (*s["c"][:2], args.rollout_prompt_len, s["c"][3])
    if args.long_prompt:
        s["d"] = (args.long_prompt, s["d"][1])
    lo, hi = s["b"][1:]
    s["b"] = (s["b"][0], min(lo, max_len // 2 - 1), min(hi, max_len // 2 - 1))   # prompt + output fits
    s["d"] = (min(s["d"][0], max_len - s["d"][1] - 1), s["d"][1])
    return s


def make_workloads(args, vocab: int, max_len: int) -> list[Workload]:
    g = torch.Generator().manual_seed(0)

    def rand_prompt(n: int) -> list[int]:
        return torch.randint(2, vocab, (n,), generator=g).tolist()

    def uni(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    s, out = sizes(args, max_len), []
    want = set(args.workloads.split(","))
    if "a" in want:
        p, n = s["a"]
        out.append(Workload("a_batch1_decode", [rand_prompt(p)],
                            [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)], False))
    if "b" in want:
        k, lo, hi = s["b"]
        prompts = [rand_prompt(uni(lo, hi)) for _ in range(k)]
        params = [SamplingParams(temperature=1.0, max_tokens=uni(lo, hi), ignore_eos=True) for _ in range(k)]
        out.append(Workload("b_offline", prompts, params, True))
    if "c" in want:
        k, n, p, new = s["c"]
        out.append(Workload("c_grpo_rollout", [rand_prompt(p) for _ in range(k)],
                            [SamplingParams(n=n, temperature=1.0, max_tokens=new, ignore_eos=True, logprobs=0,
                                            logprobs_mode="processed_logprobs")] * k,
                            True))
    if "d" in want:
        p, n = s["d"]
        out.append(Workload("d_long_context", [rand_prompt(p)],
                            [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)], False))
    return out


def output_tokens(wl: Workload) -> int:
    return sum(p.n * p.max_tokens for p in wl.params)


# ---------------------------------------------------------------------------------------------- ceilings
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, reps: int = 5) -> float:
    fn()
    ts = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(copy bandwidth bytes/s, matmul flops/s) measured on this device."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)                 # 512 MiB / 32 MiB of bf16-sized words
    x = torch.empty(n, dtype=torch.float16, device=device)
    y = torch.empty_like(x)
    bw = 2 * x.numel() * x.element_size() / timed(lambda: y.copy_(x), device)
    m = 8192 if device.type == "cuda" else 512
    a = torch.randn(m, m, dtype=dtype, device=device)
    flops = 2 * m**3 / timed(lambda: a @ a, device)
    return bw, flops


class Cost:
    """Bytes and flops of one engine step of this model (see the module docstring)."""

    def __init__(self, model):
        c, params = model.config, dict(model.named_parameters())
        nbytes = {k: p.numel() * p.element_size() for k, p in params.items()}
        routed = [k for k in params if ".experts." in k]
        self.E, self.K, self.n_moe = c.num_experts, c.num_experts_per_tok, sum(c.moe_layers)
        self.expert_bytes = sum(nbytes[k] for k in routed) / max(1, self.E * self.n_moe)
        self.expert_params = sum(params[k].numel() for k in routed) / max(1, self.E * self.n_moe)
        embed = "model.embed_tokens.weight"
        head = params.get("lm_head.weight", params[embed])
        self.head_params = head.numel()
        self.row_bytes = c.hidden_size * params[embed].element_size()
        skip = set(routed) | ({embed} if "lm_head.weight" in params else set())
        self.dense_bytes = sum(v for k, v in nbytes.items() if k not in skip)
        self.dense_params = sum(params[k].numel() for k in params if k not in skip)
        self.kv_bytes = model.kv_cache_bytes_per_block(1)                     # per token, all layers
        L, H = c.num_hidden_layers, c.num_attention_heads
        self.pair_flops = L * H * 2 * ((2 * c.kv_lora_rank + c.qk_rope_head_dim) if c.is_mla else 2 * c.head_dim)

    def step(self, T: int, B: int, kv: int, qkv: int) -> tuple[float, float]:
        touched = self.E * (1 - (1 - self.K / self.E) ** T) if self.E else 0.0
        nbytes = self.dense_bytes + self.n_moe * touched * self.expert_bytes + kv * self.kv_bytes + T * self.row_bytes
        active = self.dense_params - self.head_params + self.n_moe * self.K * self.expert_params
        flops = 2 * active * T + 2 * self.head_params * B + qkv * self.pair_flops
        return nbytes, flops

    def roofline_seconds(self, steps, bw: float, peak: float) -> float:
        return sum(max(b / bw, f / peak) for b, f in (self.step(*s) for s in steps))


# ---------------------------------------------------------------------------------------------- runs
def run_engine(llm: LLM, wl: Workload, cap: float | None) -> dict:
    first = len(llm.stats.step_log)
    sync(llm.device)
    t0 = time.perf_counter()
    ids = [llm.add_request(p, sp) for p, sp in zip(wl.prompts, wl.params)]
    tokens, capped = 0, False
    while llm.has_unfinished():
        tokens += len(llm.step())
        if cap is not None and time.perf_counter() - t0 > cap:
            capped = True
            for i in ids:
                llm.abort(i)
    sync(llm.device)
    secs = time.perf_counter() - t0
    for i in ids:
        llm.finished.pop(i, None)
    return dict(tokens=tokens, seconds=secs, steps=llm.stats.step_log[first:], capped=capped)


def hf_generate(hf, wl: Workload, device: torch.device, budget: float, batch_rows: int) -> tuple[int, float]:
    """Generated tokens (each request's wanted ones) and seconds, stopping once `budget` seconds have passed."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Deadline(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            late = time.perf_counter() > deadline
            return torch.full((input_ids.shape[0],), late, dtype=torch.bool, device=input_ids.device)

    n = wl.params[0].n
    per = max(1, batch_rows // n)                                            # prompts per generate call
    t0 = time.perf_counter()
    deadline, tokens = t0 + budget, 0
    for i in range(0, len(wl.prompts), per):
        ps, sp = wl.prompts[i:i + per], wl.params[i:i + per]
        T = max(map(len, ps))
        ids = torch.tensor([[0] * (T - len(p)) + p for p in ps], device=device)    # left padding
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in ps], device=device)
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=max(s.max_tokens for s in sp),
                          do_sample=wl.hf_sample, num_return_sequences=n, pad_token_id=0,
                          stopping_criteria=StoppingCriteriaList([Deadline()]))
        made = out.shape[1] - T
        tokens += sum(min(s.max_tokens, made) * n for s in sp)
        if time.perf_counter() > deadline:
            break
    sync(device)
    return tokens, time.perf_counter() - t0


def hf_model(model, config_dict: dict, device: torch.device, dtype: torch.dtype):
    import transformers

    cfg = transformers.AutoConfig.for_model(**config_dict)
    with torch.device(device):
        hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    res = hf.load_state_dict(model.state_dict(), strict=False)                # same weights as ours
    hf.generation_config.eos_token_id = None                                  # ignore_eos, like ours
    return hf, len(res.missing_keys)


def baselines(args, model, config_dict, workloads, device, dtype) -> dict[str, float | str]:
    out = {}
    try:
        hf, missing = hf_model(model, config_dict, device, dtype)
    except Exception as e:  # noqa: BLE001 - a baseline that cannot be built is reported, not fatal
        return {w.name: f"no model: {type(e).__name__}: {e}"[:120] for w in workloads}
    if missing:
        print(f"# transformers baseline: {missing} tensors not copied from our model (random init)")
    for wl in workloads:
        if max(map(len, wl.prompts)) > args.hf_max_prompt:
            out[wl.name] = f"skipped: prompt > --hf-max-prompt {args.hf_max_prompt}"
            continue
        try:
            with torch.inference_mode():
                tokens, secs = hf_generate(hf, wl, device, args.baseline_seconds, args.hf_batch)
            out[wl.name] = tokens / secs
        except torch.cuda.OutOfMemoryError:
            out[wl.name] = "OOM"
        except Exception as e:  # noqa: BLE001 - report and go on: the baseline is not what we test
            out[wl.name] = f"failed: {type(e).__name__}: {e}"[:160]
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del hf
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------- main
def targets(rows: list[dict]) -> dict[str, bool]:
    """Issue 7's targets for v2-lite on one H100/H200: batch-1 decode >= 600 tok/s; offline >= 10x transformers
    and > 965 tok/s (LMDeploy, DeepSeek-V2-Lite, one A100)."""
    by = {r["name"]: r for r in rows}
    out = {}
    if "a_batch1_decode" in by:
        out["a_batch1_decode >= 600 tok/s"] = by["a_batch1_decode"]["tokens_per_s"] >= 600
    if "b_offline" in by:
        b = by["b_offline"]
        out["b_offline > 965 tok/s"] = b["tokens_per_s"] > 965
        if b["speedup"] is not None:
            out["b_offline >= 10x transformers"] = b["speedup"] >= 10
    return out


def build_model(args, device: torch.device, dtype: torch.dtype):
    MoEForCausalLM = model_pkg.MoEForCausalLM
    preset_dict = importlib.import_module(model_pkg.__name__ + ".presets").preset_dict

    if args.model:
        with open(os.path.join(args.model, "config.json")) as f:
            d = json.load(f)
        return MoEForCausalLM.from_pretrained(args.model, dtype=dtype, device=device), d, args.model
    d = preset_dict(args.preset, **{k: json.loads(v) for k, v in (o.split("=", 1) for o in args.override)})
    name = args.preset + "".join(f" {o}" for o in args.override)
    return MoEForCausalLM.from_config(d, dtype=dtype, device=device), d, name


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="v2-lite (CUDA default), tiny (CPU default), tiny-v3, ...")
    ap.add_argument("--model", default=None, help="checkpoint directory instead of a preset")
    ap.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                    help="preset config fields, JSON values (e.g. num_hidden_layers=2 vocab_size=4096)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--quick", action="store_true", help="small workloads (the CPU sizes) on any device")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy box)")
    ap.add_argument("--workloads", default="a,b,c,d")
    ap.add_argument("--requests", type=int, default=None, help="(b) number of requests")
    ap.add_argument("--rollout-prompts", type=int, default=None, help="(c) prompts (x 16 samples)")
    ap.add_argument("--rollout-tokens", type=int, default=None, help="(c) new tokens per sample")
    ap.add_argument("--rollout-samples", type=int, default=None, help="(c) samples per prompt (n)")
    ap.add_argument("--rollout-prompt-len", type=int, default=None, help="(c) prompt tokens")
    ap.add_argument("--long-prompt", type=int, default=None, help="(d) prompt tokens")
    ap.add_argument("--time-cap", type=float, default=None, help="abort an engine workload after this many s")
    eng = ap.add_argument_group("engine")
    eng.add_argument("--block-size", type=int, default=64)
    eng.add_argument("--gpu-memory-fraction", type=float, default=0.9)
    eng.add_argument("--max-num-seqs", type=int, default=256)
    eng.add_argument("--max-num-batched-tokens", type=int, default=8192)
    eng.add_argument("--enforce-eager", action="store_true")
    eng.add_argument("--no-cascade", action="store_true", help="decode shared prompts without cascade attention")
    base = ap.add_argument_group("baseline")
    base.add_argument("--no-baseline", action="store_true")
    base.add_argument("--baseline-seconds", type=float, default=60.0, help="time cap per workload")
    base.add_argument("--hf-batch", type=int, default=64, help="rows per transformers generate call")
    base.add_argument("--hf-max-prompt", type=int, default=32768)
    ap.add_argument("--json", default=None, help="also write the result JSON here")
    args = ap.parse_args(argv)
    if args.preset is None and args.model is None:
        args.preset = "v2-lite" if args.device.startswith("cuda") else "tiny"
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    model, config_dict, name = build_model(args, device, dtype)
    cfg = model.config
    workloads = make_workloads(args, cfg.vocab_size, cfg.max_position_embeddings)
    base = {} if args.no_baseline else baselines(args, model, config_dict, workloads, device, dtype)
    bw, peak = measure_ceilings(device, dtype)
    llm = LLM(model, block_size=args.block_size, gpu_memory_fraction=args.gpu_memory_fraction,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              enforce_eager=args.enforce_eager, record_steps=True, cascade=not args.no_cascade,
              cpu_kv_cache_gib=0.25)
    llm.generate([[2] * 32, [3] * 8], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
    cost, rows = Cost(model), []
    for wl in workloads:
        r = run_engine(llm, wl, args.time_cap)
        b = base.get(wl.name)
        rows.append(dict(name=wl.name, requests=len(wl.prompts), samples=sum(p.n for p in wl.params),
                         output_tokens=r["tokens"], seconds=r["seconds"], tokens_per_s=r["tokens"] / r["seconds"],
                         baseline_tokens_per_s=b if isinstance(b, float) else None,
                         baseline_note=b if isinstance(b, str) else None,
                         roofline_fraction=cost.roofline_seconds(r["steps"], bw, peak) / r["seconds"],
                         capped=r["capped"], wanted_tokens=output_tokens(wl)))
        rows[-1]["speedup"] = (rows[-1]["tokens_per_s"] / rows[-1]["baseline_tokens_per_s"]
                               if rows[-1]["baseline_tokens_per_s"] else None)
    result = dict(device=device_name(device), preset=name, dtype=str(dtype).replace("torch.", ""),
                  cascade=not args.no_cascade,
                  num_blocks=llm.block_manager.num_blocks, block_size=args.block_size,
                  cuda_graphs=bool(llm.runner.graphs), graph_error=llm.runner.capture_error,
                  preemptions=llm.scheduler.num_preemptions,
                  copy_gbps=bw / 1e9, matmul_tflops=peak / 1e12, workloads=rows)
    print(f"# {result['device']}  preset {name}  {result['dtype']}  KV blocks {result['num_blocks']} x "
          f"{args.block_size}  graphs {result['cuda_graphs']}  copy {bw / 1e9:.0f} GB/s  matmul {peak / 1e12:.1f} "
          f"TFLOP/s  preemptions {result['preemptions']}")
    print_table(rows, [("name", "workload", "s"), ("requests", "req", "d"), ("samples", "seqs", "d"),
                       ("output_tokens", "tokens", "d"), ("seconds", "s", ".2f"), ("tokens_per_s", "tok/s", ".1f"),
                       ("baseline_tokens_per_s", "hf tok/s", ".1f"), ("speedup", "x hf", ".2f"),
                       ("roofline_fraction", "roofline", ".3f")])
    if name == "v2-lite" and device.type == "cuda":
        result["targets"] = targets(rows)
        for k, ok in result["targets"].items():
            print(f"# target {k}: {'met' if ok else 'NOT met'}")
    if result["graph_error"]:
        print(f"# CUDA graph capture failed, decode ran eagerly: {result['graph_error']}")
    for r in rows:
        if r["baseline_note"]:
            print(f"# {r['name']} baseline: {r['baseline_note']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print_json(result)
    return result


if __name__ == "__main__":
    main()
