"""Safetensors checkpoints in the Hugging Face layout: streaming load into `MoEForCausalLM`, and save back.

Load: the model is built on the meta device, materialised (uninitialised) on the target device and dtype, then
every checkpoint tensor is read one at a time (safetensors memory-maps the shard) and copied into its parameter,
so host memory peaks at about one tensor, never the model twice. Experts are accepted per expert
(`mlp.experts.N.gate_proj/up_proj/down_proj.weight`, as DeepSeek-V2-Lite, Qwen3-MoE and transformers'
save_pretrained write them) or fused (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I],
transformers' in-memory layout). Only safetensors (no pickle, no remote code). A missing, misshapen or unknown
tensor, an fp8 checkpoint, or an unsupported model_type raises an error naming it.

Save: config.json (the original fields kept) + safetensors shards (with model.safetensors.index.json when more
than one) in the per-expert layout, which transformers loads.
"""

from __future__ import annotations

import json
import math
import os
import re

import torch

from .config import load_config

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _shard_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, x) for x in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    found = sorted(x for x in os.listdir(path) if x.endswith(".safetensors"))
    if found:
        return [os.path.join(path, x) for x in found]
    raise FileNotFoundError(f"{path}: no safetensors checkpoint (model.safetensors or an index); pickle "
                            "checkpoints (.bin, .pt) are not loaded")


class _Targets:
    """Maps checkpoint names to destination tensors and remembers what was filled."""

    def __init__(self, model):
        self.cfg = model.config
        self.state = model.state_dict(keep_vars=True)
        if self.cfg.tie_word_embeddings:
            self.state.pop("lm_head.weight", None)
        self.filled: set = set()

    def required(self) -> list[str]:
        """Every checkpoint name a complete per-expert checkpoint has."""
        names = []
        for k, t in self.state.items():
            if k.endswith("mlp.experts.gate_up_proj"):
                p = k[: -len(".gate_up_proj")]
                names += [f"{p}.{e}.{w}.weight" for e in range(t.shape[0]) for w in ("gate_proj", "up_proj")]
            elif k.endswith("mlp.experts.down_proj"):
                p = k[: -len(".down_proj")]
                names += [f"{p}.{e}.down_proj.weight" for e in range(t.shape[0])]
            else:
                names.append(k)
        return names

    def ignorable(self, name: str) -> bool:
        if "rotary_emb.inv_freq" in name:
            return True
        m = _LAYER.match(name)  # DeepSeek-V3's multi-token-prediction layers sit past num_hidden_layers
        if m and int(m.group(1)) >= self.cfg.num_hidden_layers:
            return True
        return name == "lm_head.weight" and self.cfg.tie_word_embeddings

    def region(self, name: str) -> tuple[str, tuple, list[str]] | None:
        """-> (state key, index into that full tensor, the required names it covers), or None for an unknown name.
        A per-expert tensor is one expert's rows of the fused tensor: (e, slice(0, I)) of gate_up_proj [E, 2I, H]."""
        m = _EXPERT.match(name)
        if m:
            p, e, w = m.group(1), int(m.group(2)), m.group(3)
            key = f"{p}.down_proj" if w == "down_proj" else f"{p}.gate_up_proj"
            t = self.state.get(key)
            if t is None or e >= t.shape[0]:
                return None
            if w == "down_proj":
                return key, (e,), [name]
            inter = t.shape[1] // 2
            return key, (e, slice(0, inter) if w == "gate_proj" else slice(inter, 2 * inter)), [name]
        t = self.state.get(name)
        if t is None:
            return None
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            p = name.rsplit(".", 1)[0]
            parts = ("gate_proj", "up_proj") if name.endswith("gate_up_proj") else ("down_proj",)
            return name, (), [f"{p}.{e}.{w}.weight" for e in range(t.shape[0]) for w in parts]
        return name, (), [name]

    def dest(self, name: str) -> tuple[torch.Tensor, list[str]] | None:
        """-> (destination view, the required names it covers), or None for an unknown name."""
        r = self.region(name)
        if r is None:
            return None
        key, index, covers = r
        return self.state[key].data[index], covers


@torch.no_grad()
def load_pretrained(cls, path: str, dtype=None, device=None):
    """Build `cls` from `<path>/config.json` and stream the safetensors weights into it."""
    from safetensors import safe_open

    cfg = load_config(path)
    if isinstance(dtype, str):
        dtype = _DTYPES[dtype]
    dtype = dtype or _DTYPES.get(str(cfg.dtype).replace("torch.", ""), torch.float32)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = cls(cfg)
    model.cast(dtype)  # still on meta: materialise once, directly in dtype
    model.to_empty(device=device)
    model.tie_weights()
    targets = _Targets(model)
    unknown = []
    for file in _shard_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                d = targets.dest(name)
                if d is None:
                    if not targets.ignorable(name):
                        unknown.append(name)
                    continue
                dst, covers = d
                t = f.get_tensor(name)
                if t.dtype.is_floating_point and t.element_size() == 1:
                    raise ValueError(f"{name}: {t.dtype} checkpoints are not supported (dequantize to bf16 first)")
                if tuple(t.shape) != tuple(dst.shape):
                    raise ValueError(f"{name}: shape {list(t.shape)} in {os.path.basename(file)}, the config "
                                     f"needs {list(dst.shape)}")
                dst.copy_(t)
                targets.filled.update(covers)
    if unknown:
        raise ValueError(f"{len(unknown)} unexpected tensor(s) in the checkpoint (not part of a "
                         f"{cfg.model_type} model with this config): {', '.join(unknown[:8])}")
    missing = [n for n in targets.required() if n not in targets.filled]
    if missing:
        raise ValueError(f"{len(missing)} tensor(s) missing from the checkpoint at {path}: {', '.join(missing[:8])}")
    return model.eval()


def hf_split(key: str, t: torch.Tensor):
    """One state-dict tensor -> (checkpoint name, view) in the per-expert layout transformers reads (the fused
    experts.gate_up_proj [E, 2I, H] -> E gate_proj and up_proj [I, H]; down_proj [E, H, I] -> E [H, I])."""
    if key.endswith("mlp.experts.gate_up_proj"):
        p, inter = key[: -len(".gate_up_proj")], t.shape[1] // 2
        for e in range(t.shape[0]):
            yield f"{p}.{e}.gate_proj.weight", t[e, :inter]
            yield f"{p}.{e}.up_proj.weight", t[e, inter:]
    elif key.endswith("mlp.experts.down_proj"):
        p = key[: -len(".down_proj")]
        for e in range(t.shape[0]):
            yield f"{p}.{e}.down_proj.weight", t[e]
    else:
        yield key, t


def _hf_tensors(model):
    """Yields (checkpoint name, tensor view) in the per-expert layout, one tensor at a time."""
    tied = model.config.tie_word_embeddings
    for k, t in model.state_dict().items():
        if not (tied and k == "lm_head.weight"):
            yield from hf_split(k, t)


_ST_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
HF_ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
                    "qwen3_moe": "Qwen3MoeForCausalLM"}


def write_hf_checkpoint(path: str, config: dict, plan: list, tensors, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write a Hugging Face checkpoint: config.json, safetensors shards (model.safetensors, or
    model-0000i-of-0000n.safetensors + model.safetensors.index.json). `plan` lists (name, shape, dtype) in the
    order the iterator `tensors` yields (name, tensor); each tensor is cast to its planned dtype. Shards are laid
    out from the plan and written header first, then tensor by tensor: host memory ~ one tensor, never a shard."""
    import struct

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    shards, cur, size = [], [], 0
    for name, shape, dtype in plan:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, tuple(shape), dtype, nbytes))
        size += nbytes
    shards.append(cur)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    it = iter(tensors)
    for fname, shard in zip(names, shards):
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype, nbytes in shard:
            header[name] = {"dtype": _ST_CODES[dtype], "shape": list(shape), "data_offsets": [off, off + nbytes]}
            off += nbytes
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        tmp = os.path.join(path, fname + ".partial")
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head)
            for name, shape, dtype, _ in shard:
                got, t = next(it)
                if got != name or tuple(t.shape) != shape:
                    raise RuntimeError(f"write_hf_checkpoint: expected {name} {list(shape)}, got {got} "
                                       f"{list(t.shape)}")
                f.write(t.detach().to("cpu", dtype).contiguous().reshape(-1).view(torch.uint8).numpy().data)
        os.replace(tmp, os.path.join(path, fname))
    if n > 1:
        total = sum(nb for shard in shards for *_, nb in shard)
        weight_map = {name: fname for fname, shard in zip(names, shards) for name, *_ in shard}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def hf_config(model_config, dtype: torch.dtype) -> dict:
    """config.json for a checkpoint in `dtype`: the original fields, architectures, and the dtype under both
    names (transformers >= 4.56 reads `dtype`, older ones `torch_dtype`)."""
    cfg = model_config.to_dict()
    cfg["dtype"] = cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    cfg.setdefault("architectures", [HF_ARCHITECTURES[model_config.model_type]])
    return cfg


@torch.no_grad()
def save_pretrained(model, path: str, max_shard_bytes: int = 5 * 2**30) -> None:
    plan = [(n, t.shape, t.dtype) for n, t in _hf_tensors(model)]
    write_hf_checkpoint(path, hf_config(model.config, model.dtype), plan, _hf_tensors(model), max_shard_bytes)
