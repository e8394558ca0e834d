"""Environment report: `python -m dsmath_kernels [--json] [--preset NAME | --model DIR] [--device DEV]` — package
version, whether CUDA kernels were compiled and for which archs, torch / triton versions, the visible GPU, and the
backend each op will use. With a model (a preset of model/presets.py, or a checkpoint directory's config.json) the
backends are those of the calls that model's engine and trainer make: each op is explained (dsmath_kernels.explain)
on small tensors with the model's head dims, expert counts, vocab and dtypes (engine: the checkpoint dtype, bf16 by
default; trainer: fp32, train/config.py's default), so a fallback that only some shapes hit shows up here."""

from __future__ import annotations

import argparse
import json
import os

import torch

import dsmath_kernels
from dsmath_kernels import _ext
from dsmath_kernels._registry import backends

ENGINE_BLOCK_SIZE = 64  # model/engine default (FlashMLA's block size)
TRAINER_DTYPE = torch.float32  # train/config.py default


def report(device: torch.device | None = None) -> dict:
    try:
        import triton  # noqa: PLC0415

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = _ext.build_info()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if device is None:
        device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    return {
        "version": dsmath_kernels.__version__,
        "compiled_module": info["compiled"],
        "cuda_compiled": info["cuda_compiled"],
        "cuda_archs": info["cuda_archs"],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "gpu": gpu,
        "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if gpu else None,
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "backends": backends(device),
    }


def load_config(preset: str | None = None, model: str | None = None) -> dict:
    """HF config dict of a preset (model/presets.py, in the dsmath repository) or of DIR/config.json."""
    if model is not None:
        path = os.path.join(model, "config.json") if os.path.isdir(model) else model
        with open(path) as f:
            return json.load(f)
    try:
        from model.presets import preset_dict  # noqa: PLC0415
    except ImportError as e:
        raise SystemExit("--preset needs the dsmath repository's model/ package on the path (or use --model DIR)") \
            from e
    return preset_dict(preset)


def _dtype(cfg: dict) -> torch.dtype:
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16").replace("torch.", "")
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(name, torch.bfloat16)


def _big(dtype: torch.dtype, device: torch.device, *shape: int) -> torch.Tensor:
    """A weight of the model's shape without its memory (an expanded view: the choices never read weights)."""
    return torch.zeros((1,) * len(shape), dtype=dtype, device=device).expand(*shape)


def model_calls(cfg: dict, device: torch.device) -> list[tuple[str, str, tuple, dict]]:
    """(phase, op, args, kwargs) of the calls a model's engine and trainer make, on small tensors with the model's
    per-head / per-expert dims (few tokens, few blocks: the choice depends on dims, dtypes and layouts)."""
    t = cfg.get("model_type", "deepseek_v2")
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    E = cfg.get("n_routed_experts") or cfg.get("num_experts") or 0
    K = cfg.get("num_experts_per_tok") or 1
    n_group = cfg.get("n_group") or 1
    topk_group = cfg.get("topk_group") or 1
    if t == "deepseek_v2" and cfg.get("topk_method", "greedy") == "greedy":
        n_group = topk_group = 1
    scoring = "sigmoid" if t == "deepseek_v3" else cfg.get("scoring_func", "softmax")
    I = cfg.get("moe_intermediate_size") or cfg.get("intermediate_size")  # noqa: E741
    heads = cfg["num_attention_heads"]
    eng = _dtype(cfg)
    dev = dict(device=device)
    i32 = dict(dtype=torch.int32, device=device)
    T, B, NB, BS = 8, 4, 8, ENGINE_BLOCK_SIZE
    bt = torch.arange(B * 2, **i32).view(B, 2) % NB
    sl = torch.full((B,), 3, **i32)
    cu = torch.arange(B + 1, **i32)
    slots = torch.arange(B, **i32)
    calls: list[tuple[str, str, tuple, dict]] = []
    if E:
        ids = torch.arange(T * K, **i32).view(T, K) % E
        weights = torch.full((T, K), 1.0 / K, **dev)
        route_kw = dict(scoring=scoring, n_group=n_group, topk_group=topk_group,
                        bias=torch.zeros(E, **dev) if scoring == "sigmoid" else None)
        for phase, dt in (("engine", eng), ("trainer", TRAINER_DTYPE)):
            calls.append((phase, "route_topk", (torch.zeros(T, E, dtype=dt, **dev), min(K, E)), route_kw))
            calls.append((phase, "moe_permute", (ids, E), {}))
            x = torch.zeros(T, H, dtype=dt, **dev)
            w_gu, w_dn = _big(dt, device, E, 2 * I, H), _big(dt, device, E, H, I)
            calls.append((phase, "moe_experts", (x, w_gu, w_dn, weights, ids), {}))
            off = torch.zeros(E + 1, **i32)
            calls.append((phase, "grouped_gemm", (torch.zeros(T * K, H, dtype=dt, **dev), w_gu, off), {}))
    if cfg.get("quantization_config"):  # an FP8 checkpoint: the engine's experts and linears take the FP8 ops
        f8, nb = torch.float8_e4m3fn, lambda n: -(-n // 128)
        x = torch.zeros(T, H, dtype=eng, **dev)
        w, ws = _big(f8, device, H, H), _big(torch.float32, device, nb(H), nb(H))
        calls.append(("engine", "fp8_linear", (x, w, ws), {}))
        if E:
            fp8_experts = (_big(f8, device, E, 2 * I, H), _big(torch.float32, device, E, 2 * nb(I), nb(H)),
                           _big(f8, device, E, H, I), _big(torch.float32, device, E, nb(H), nb(I)))
            calls.append(("engine", "moe_experts_fp8", (x, *fp8_experts, weights, ids), {}))
    if cfg.get("kv_lora_rank"):  # MLA (absorbed): latent rows Dc + Dr, values the first Dc
        Dc, Dr = cfg["kv_lora_rank"], cfg.get("qk_rope_head_dim", 64)
        kv = torch.zeros(NB, BS, Dc + Dr, dtype=eng, **dev)
        calls += [
            ("engine", "mla_cache_write", (torch.zeros(B, Dc + Dr, dtype=eng, **dev), kv, slots), {}),
            ("engine", "mla_decode", (torch.zeros(B, heads, Dc + Dr, dtype=eng, **dev), kv, bt, sl, 0.1),
             dict(v_head_dim=Dc)),
            ("engine", "mla_prefill", (torch.zeros(B, heads, Dc + Dr, dtype=eng, **dev), kv, bt, cu, sl, 0.1),
             dict(v_head_dim=Dc, max_seqlen_q=1)),
        ]
    else:
        Hkv = cfg.get("num_key_value_heads") or heads
        D = cfg.get("head_dim") or H // heads
        kc, vc = torch.zeros(NB, BS, Hkv, D, dtype=eng, **dev), torch.zeros(NB, BS, Hkv, D, dtype=eng, **dev)
        calls += [
            ("engine", "cache_write", (torch.zeros(B, Hkv, D, dtype=eng, **dev),) * 2 + (kc, vc, slots), {}),
            ("engine", "paged_decode", (torch.zeros(B, heads, D, dtype=eng, **dev), kc, vc, bt, sl, 0.1), {}),
            ("engine", "paged_prefill", (torch.zeros(B, heads, D, dtype=eng, **dev), kc, vc, bt, cu, sl, 0.1),
             dict(max_seqlen_q=1)),
        ]
    hid = torch.zeros(2, 3, H, dtype=TRAINER_DTYPE, **dev)
    w = _big(TRAINER_DTYPE, device, V, H)
    tgt = torch.zeros(2, 3, dtype=torch.long, device=device)
    mask = torch.ones(2, 3, dtype=torch.bool, device=device)
    calls += [
        ("trainer", "token_logprobs", (hid, w, tgt), {}),
        ("trainer", "grpo_loss", (hid, w, tgt, mask, torch.zeros(2, **dev)), {}),
    ]
    return calls


def model_report(cfg: dict, device: torch.device) -> list[dict]:
    rows = []
    for phase, op, args, kwargs in model_calls(cfg, device):
        c = dsmath_kernels.explain(op, *args, **kwargs)
        rows.append({"phase": phase, "op": op, "dtype": str(args[0].dtype).replace("torch.", ""),
                     "backend": c.backend, "fallback": c.fallback, "reason": c.reason, "fix": c.fix})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dsmath_kernels", description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print the report as one JSON object")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--preset", default=None, help="a model preset (model/presets.py): v2-lite, tiny-v3, ...")
    g.add_argument("--model", default=None, help="a checkpoint directory (its config.json)")
    ap.add_argument("--device", default=None, help="device to explain the calls on (default: cuda:0 if any, else cpu)")
    a = ap.parse_args(argv)
    device = torch.device(a.device) if a.device else None
    r = report(device)
    if a.preset or a.model:
        r["model"] = a.preset or a.model
        r["model_backends"] = model_report(load_config(a.preset, a.model), torch.device(r["device"]))
    if a.json:
        print(json.dumps(r))
        return
    print(f"dsmath_kernels {r['version']}")
    print(f"  compiled module : {'yes' if r['compiled_module'] else 'no (pure-Python fallbacks)'}")
    print(f"  CUDA kernels    : {'yes, archs ' + ','.join(r['cuda_archs']) if r['cuda_compiled'] else 'no'}")
    print(f"  torch           : {r['torch']} (CUDA {r['torch_cuda']})")
    print(f"  triton          : {r['triton']}")
    print(f"  GPU             : {r['gpu'] or 'none'}" + (f" (sm_{r['gpu_capability']})" if r["gpu"] else ""))
    print(f"  backends on {r['device']} (default shapes):")
    for op, name in r["backends"].items():
        print(f"    {op:<20} {name}")
    if "model_backends" in r:
        print(f"  backends of {r['model']}'s calls on {r['device']}:")
        for m in r["model_backends"]:
            why = f"  ({'FALLBACK: ' if m['fallback'] else ''}{m['reason']})" if m["reason"] else ""
            print(f"    {m['phase']:<8} {m['op']:<16} {m['dtype']:<9} {m['backend']}{why}")


if __name__ == "__main__":
    main()
