"""Export a trainer checkpoint (torch.distributed.checkpoint shards) as a Hugging Face checkpoint.

    python -m train.export runs/x/ckpt/step_000100 out/ [--dtype bfloat16] [--max-shard-gib 5]
    python -m train.export runs/x out/                   # a run directory: its latest checkpoint

Writes safetensors shards (+ model.safetensors.index.json when more than one) in the per-expert layout,
config.json (the model's fields, `dtype` and `torch_dtype`), the tokenizer files and generation_config.json:
transformers' AutoModelForCausalLM and our LLM / MoEForCausalLM.from_pretrained load the directory. Weights are
cast to --dtype (default: the run's compute dtype), except DeepSeek's routers, which stay float32 as our model and
transformers keep them in memory. No process group is needed, and nothing is gathered: parameters are read from
the shards one bucket (128 MiB, or one larger parameter) at a time and written tensor by tensor, so host memory
stays ~ the largest parameter in float32 whatever the model size. The trainer runs this on its final checkpoint
(OUT/hf/step_N).
"""

from __future__ import annotations

import argparse
import os
import shutil
import warnings

import torch

from ._pkg import model_module

_DCP_FILES = (".metadata", "trainer_state.pt", "config.json")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory, or a run directory (-> its ckpt/latest)."""
    if os.path.exists(os.path.join(path, ".metadata")):
        return path
    latest = os.path.join(path, "ckpt", "latest")
    if os.path.exists(latest):
        return os.path.join(path, "ckpt", open(latest).read().strip())
    raise FileNotFoundError(f"{path}: neither a trainer checkpoint (ckpt/step_N with .metadata) nor a run directory "
                            "with ckpt/latest")


def _keep_fp32(name: str) -> bool:
    return name.endswith(("mlp.gate.weight", "e_score_correction_bias"))


def export_checkpoint(ckpt: str, out: str, dtype: str | None = None, max_shard_bytes: int = 5 * 2**30,
                      bucket_bytes: int = 2**27) -> str:
    """CKPT (train.grpo's ckpt/step_N, or a run directory) -> a Hugging Face checkpoint in `out`. -> out."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    loader = model_module("loader")
    ckpt = resolve_checkpoint(ckpt)
    mcfg = model_module("config").load_config(ckpt)
    if dtype is None:
        state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False)
        dtype = state.get("compute_dtype", "bfloat16")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: float32|bfloat16|float16, got {dtype!r}")
    dt = _DTYPES[dtype]
    reader = FileSystemReader(ckpt)
    meta = reader.read_metadata().state_dict_metadata
    prefix = "model.lm."
    keys = [k for k, v in meta.items() if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)]
    if not keys:
        raise ValueError(f"{ckpt}: no model.lm.* tensors in the checkpoint (not written by train.grpo?)")
    if mcfg.tie_word_embeddings:
        keys = [k for k in keys if k != prefix + "lm_head.weight"]
    with torch.device("meta"):
        on_meta = {k: torch.empty(meta[k].size, dtype=meta[k].properties.dtype) for k in keys}
    plan = [(n, v.shape, torch.float32 if _keep_fp32(n) else dt)
            for k in keys for n, v in loader.hf_split(k[len(prefix):], on_meta[k])]
    loader.write_hf_checkpoint(out, loader.hf_config(mcfg, dt), plan, _stream(reader, keys, meta, prefix, bucket_bytes),
                               max_shard_bytes)
    for f in os.listdir(ckpt):  # tokenizer files (and anything else that is not the DCP shards)
        if f not in _DCP_FILES and not f.endswith(".distcp") and os.path.isfile(os.path.join(ckpt, f)):
            shutil.copy(os.path.join(ckpt, f), os.path.join(out, f))
    _generation_config(mcfg, out)
    return out


def _stream(reader, keys: list[str], meta, prefix: str, bucket_bytes: int):
    """(checkpoint name, tensor) in `keys` order, reading the DCP shards a bucket of parameters at a time."""
    import torch.distributed.checkpoint as dcp

    loader = model_module("loader")
    i = 0
    while i < len(keys):
        bucket, size = [], 0
        while i < len(keys) and (not bucket or size + _nbytes(meta[keys[i]]) <= bucket_bytes):
            bucket.append(keys[i])
            size += _nbytes(meta[keys[i]])
            i += 1
        sd = {k: torch.empty(meta[k].size, dtype=meta[k].properties.dtype) for k in bucket}
        with warnings.catch_warnings():  # DCP says it assumes a single process: it is one
            warnings.filterwarnings("ignore", message="torch.distributed is .*uninitialized")
            dcp.load(sd, storage_reader=reader, no_dist=True)
        for k in bucket:
            yield from loader.hf_split(k[len(prefix):], sd.pop(k))


def _nbytes(m) -> int:
    return m.size.numel() * torch.empty((), dtype=m.properties.dtype).element_size()


def _generation_config(mcfg, out: str) -> None:
    if os.path.exists(os.path.join(out, "generation_config.json")):
        return
    try:
        from transformers import GenerationConfig
    except ImportError:  # pragma: no cover - transformers is a dependency of train
        return
    GenerationConfig(bos_token_id=mcfg.bos_token_id, eos_token_id=mcfg.eos_token_id).save_pretrained(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt", help="ckpt/step_N of a train.grpo run, or the run directory (its latest checkpoint)")
    ap.add_argument("out", help="output directory (Hugging Face layout)")
    ap.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="default: the run's compute dtype")
    ap.add_argument("--max-shard-gib", type=float, default=5.0)
    a = ap.parse_args(argv)
    out = export_checkpoint(a.ckpt, a.out, a.dtype, max_shard_bytes=int(a.max_shard_gib * 2**30))
    print(out)


if __name__ == "__main__":
    main()
