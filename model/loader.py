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

    def dest(self, name: str) -> tuple[torch.Tensor, list[str]] | None:
        """-> (destination view, the required names it covers), or None for an unknown name."""
        m = _EXPERT.match(name)
        if m:
            p, e, w = m.group(1), int(m.group(2)), m.group(3)
            if w == "down_proj":
                t = self.state.get(f"{p}.down_proj")
                return None if t is None or e >= t.shape[0] else (t.data[e], [name])
            t = self.state.get(f"{p}.gate_up_proj")
            if t is None or e >= t.shape[0]:
                return None
            inter = t.shape[1] // 2
            return (t.data[e, :inter] if w == "gate_proj" else t.data[e, inter:]), [name]
        t = self.state.get(name)
        if t is None:
            return None
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            p = name.rsplit(".", 1)[0]
            parts = ("gate_proj", "up_proj") if name.endswith("gate_up_proj") else ("down_proj",)
            return t.data, [f"{p}.{e}.{w}.weight" for e in range(t.shape[0]) for w in parts]
        return t.data, [name]


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


def _hf_tensors(model):
    """Yields (checkpoint name, CPU tensor) in the per-expert layout, one tensor at a time."""
    state = model.state_dict()
    tied = model.config.tie_word_embeddings
    for k, t in state.items():
        if tied and k == "lm_head.weight":
            continue
        if k.endswith("mlp.experts.gate_up_proj"):
            p, inter = k[: -len(".gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                yield f"{p}.{e}.gate_proj.weight", t[e, :inter]
                yield f"{p}.{e}.up_proj.weight", t[e, inter:]
        elif k.endswith("mlp.experts.down_proj"):
            p = k[: -len(".down_proj")]
            for e in range(t.shape[0]):
                yield f"{p}.{e}.down_proj.weight", t[e]
        else:
            yield k, t


def _write_shard(tensors: dict, path: str) -> None:
    from safetensors.torch import save_file
    save_file(tensors, path, metadata={"format": "pt"})


@torch.no_grad()
def save_pretrained(model, path: str, max_shard_bytes: int = 5 * 2**30) -> None:
    os.makedirs(path, exist_ok=True)
    cfg = model.config.to_dict()
    cfg["dtype"] = str(model.dtype).replace("torch.", "")
    cfg.pop("torch_dtype", None)
    arch = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
            "qwen3_moe": "Qwen3MoeForCausalLM"}[model.config.model_type]
    cfg.setdefault("architectures", [arch])
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)

    files, weight_map, cur, size, total = [], {}, {}, 0, 0

    def flush():
        nonlocal cur, size
        fname = f"model-{len(files) + 1:05d}.partial.safetensors"
        _write_shard(cur, os.path.join(path, fname))  # written as soon as full: host memory ~ one shard
        files.append(fname)
        weight_map.update({n: fname for n in cur})
        cur, size = {}, 0

    for name, t in _hf_tensors(model):
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_shard_bytes:
            flush()
        cur[name] = t.detach().to("cpu").contiguous()
        size += nbytes
        total += nbytes
    if cur or not files:
        flush()
    if len(files) == 1:
        os.replace(os.path.join(path, files[0]), os.path.join(path, "model.safetensors"))
        return
    final = {f: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files)}
    for f, g in final.items():
        os.replace(os.path.join(path, f), os.path.join(path, g))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": {n: final[v] for n, v in weight_map.items()}},
                  f, indent=2)
