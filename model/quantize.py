"""Write a DeepSeek-format FP8 checkpoint from a bf16 / fp32 one:

    python -m model.quantize SRC OUT --fp8-block 128 [--max-shard-gb 5]

Every linear weight of the decoder layers (`model.layers.N.*_proj[_with_mqa].weight`: attention projections, dense MLPs,
shared and routed experts) becomes e4m3 with a `weight_scale_inv` [ceil(N/128), ceil(K/128)] fp32 tensor, one
scale per 128 x 128 block (scale = amax / 448, so W = weight * weight_scale_inv); embeddings, the LM head, routers,
score-correction biases and norms are copied unchanged. config.json gains DeepSeek-V3's quantization_config
{quant_method: fp8, fmt: e4m3, activation_scheme: dynamic, weight_block_size: [128, 128]}; the other files in SRC
(tokenizer, generation config) are copied. Experts are written per expert (a fused gate_up_proj [E, 2I, H] is split,
and gate / up are quantised separately), so the result loads here and in other DeepSeek-V3 FP8 readers.
Streams one tensor at a time: host memory stays about one output shard."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil

from .loader import by_file, read_headers, write_shards

_QUANTISED = re.compile(r"^model\.layers\.\d+\..*_proj(_with_mqa)?\.weight$")
_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": [128, 128]}


def _tensors(src: str):
    """(name, tensor) of the output checkpoint, one source tensor read at a time."""
    from safetensors import safe_open

    import dsmath_kernels as dk

    for file, names in by_file(read_headers(src)).items():
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in names:
                t = f.get_tensor(name)
                if t.dtype.is_floating_point and t.element_size() == 1:
                    raise ValueError(f"{name}: already {t.dtype} (SRC is an FP8 checkpoint)")
                fused = _FUSED.match(name)
                if fused:  # transformers' in-memory layout: split per expert (gate / up each with their blocks)
                    p, w = fused.groups()
                    half = t.shape[1] // 2
                    for e in range(t.shape[0]):
                        parts = [("down_proj", t[e])] if w == "down_proj" else \
                            [("gate_proj", t[e, :half]), ("up_proj", t[e, half:])]
                        for proj, x in parts:
                            q, s = dk.quantize_fp8_blocks(x.float())
                            yield f"{p}.{e}.{proj}.weight", q
                            yield f"{p}.{e}.{proj}.weight_scale_inv", s
                elif _QUANTISED.match(name) and t.dim() == 2:
                    q, s = dk.quantize_fp8_blocks(t.float())
                    yield name, q
                    yield name + "_scale_inv", s
                else:
                    yield name, t


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
    os.makedirs(out, exist_ok=True)
    write_shards(out, _tensors(src), max_shard_bytes)
    cfg["quantization_config"] = dict(QUANTIZATION_CONFIG)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
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
