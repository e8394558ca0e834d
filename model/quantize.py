"""Write a DeepSeek-format FP8 checkpoint from a bf16 / fp32 one:

    python -m model.quantize SRC OUT --fp8-block 128 [--max-shard-gb 5]

Every linear weight of the decoder layers (`model.layers.N.*_proj[_with_mqa].weight`: attention projections, dense MLPs,
shared and routed experts) becomes e4m3 with a `weight_scale_inv` [ceil(N/128), ceil(K/128)] fp32 tensor, one
scale per 128 x 128 block (scale = amax / 448, so W = weight * weight_scale_inv); embeddings, the LM head, routers,
score-correction biases and norms are copied unchanged. config.json gains DeepSeek-V3's quantization_config
{quant_method: fp8, fmt: e4m3, activation_scheme: dynamic, weight_block_size: [128, 128]}; the other files in SRC
(tokenizer, generation config) are copied. Experts are written per expert (a fused gate_up_proj [E, 2I, H] is split,
and gate / up are quantised separately), so the result loads here and in other DeepSeek-V3 FP8 readers.
Streams one tensor at a time: host memory stays about one source tensor."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil

import torch

from .loader import _ST_CODES, by_file, read_headers, write_hf_checkpoint

_QUANTISED = re.compile(r"^model\.layers\.\d+\..*_proj(_with_mqa)?\.weight$")
_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": [128, 128]}
_DTYPE = {code: dt for dt, code in _ST_CODES.items()}


def _nb(n: int) -> int:
    return -(-n // 128)


def _layout(headers: dict) -> list[tuple]:
    """The output checkpoint from the source headers alone (no data read): per output tensor (name, shape, dtype,
    source name, index into the source tensor, kind: "copy", "weight" (quantised) or "scale" (its
    weight_scale_inv, right after it))."""
    out = []
    for names in by_file(headers).values():
        for name in names:
            _, shape, code = headers[name]
            if code.startswith("F8"):
                raise ValueError(f"{name}: already {code} (SRC is an FP8 checkpoint)")
            fused = _FUSED.match(name)
            if fused:  # transformers' in-memory layout: split per expert (gate / up each with their blocks)
                p, w = fused.groups()
                half = shape[1] // 2
                parts = [("down_proj", lambda e: (e,), shape[1:])] if w == "down_proj" else \
                    [("gate_proj", lambda e: (e, slice(0, half)), [half, shape[2]]),
                     ("up_proj", lambda e: (e, slice(half, 2 * half)), [half, shape[2]])]
                weights = [(f"{p}.{e}.{proj}.weight", sub, index(e)) for e in range(shape[0])
                           for proj, index, sub in parts]
            elif _QUANTISED.match(name) and len(shape) == 2:
                weights = [(name, shape, ())]
            else:
                out.append((name, shape, _DTYPE[code], name, (), "copy"))
                continue
            for wname, sub, index in weights:
                out.append((wname, sub, torch.float8_e4m3fn, name, index, "weight"))
                out.append((wname + "_scale_inv", [_nb(sub[0]), _nb(sub[1])], torch.float32, name, index, "scale"))
    return out


def _tensors(headers: dict, layout: list[tuple]):
    """(name, tensor) per layout entry, each source tensor read once (entries from one source are adjacent)."""
    from safetensors import safe_open

    import dsmath_kernels as dk

    handles, cur, src, scale = {}, None, None, None
    try:
        for name, _shape, _dtype, source, index, kind in layout:
            if source != cur:
                file = headers[source][0]
                if file not in handles:
                    handles[file] = safe_open(file, framework="pt", device="cpu").__enter__()
                cur, src = source, handles[file].get_tensor(source)
            if kind == "copy":
                yield name, src
            elif kind == "weight":
                q, scale = dk.quantize_fp8_blocks(src[index].float())
                yield name, q
            else:
                yield name, scale
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)


def quantize_checkpoint(src: str, out: str, block: int = 128, max_shard_bytes: int = 5 * 2**30) -> None:
    """SRC (bf16 / fp32 safetensors checkpoint directory) -> OUT (DeepSeek-V3 FP8 format)."""
    if block != 128:
        raise ValueError(f"--fp8-block: only 128 (128 x 128 blocks, DeepSeek-V3 / DeepGEMM) is supported, got {block}")
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("quantization_config"):
        raise ValueError(f"{src}: config.json already has a quantization_config ({cfg['quantization_config']})")
    if os.path.abspath(src) == os.path.abspath(out):
        raise ValueError("OUT: must differ from SRC")
    cfg["quantization_config"] = dict(QUANTIZATION_CONFIG)
    headers = read_headers(src)
    layout = _layout(headers)
    write_hf_checkpoint(out, cfg, [entry[:3] for entry in layout], _tensors(headers, layout), max_shard_bytes)
    for name in os.listdir(src):  # tokenizer, generation config, ...
        full = os.path.join(src, name)
        if os.path.isfile(full) and not name.endswith(".safetensors") and name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy2(full, os.path.join(out, name))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m model.quantize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="bf16 / fp32 safetensors checkpoint directory")
    ap.add_argument("out", help="output directory (DeepSeek-V3 FP8 format)")
    ap.add_argument("--fp8-block", type=int, default=128, help="block size of the weight scales (128 only)")
    ap.add_argument("--max-shard-gb", type=float, default=5.0, help="largest output shard (GiB)")
    a = ap.parse_args(argv)
    quantize_checkpoint(a.src, a.out, a.fp8_block, int(a.max_shard_gb * 2**30))
    print(f"wrote {a.out} (FP8 e4m3, 128 x 128 block scales)")


if __name__ == "__main__":
    main()
