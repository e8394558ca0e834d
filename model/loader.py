"""Safetensors checkpoints in the Hugging Face layout: streaming load into `MoEForCausalLM`, and save back.

Load: the model is built on the meta device, materialised (uninitialised) on the target device and dtype, then
every checkpoint tensor is read one at a time (safetensors memory-maps the shard) and copied into its parameter,
so host memory peaks at about one tensor, never the model twice. Experts are accepted per expert
(`mlp.experts.N.gate_proj/up_proj/down_proj.weight`, as DeepSeek-V2-Lite, Qwen3-MoE and transformers'
save_pretrained write them) or fused (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I],
transformers' in-memory layout). Only safetensors (no pickle, no remote code). A missing, misshapen or unknown
tensor, an FP8 tensor where the config expects float (or the reverse), or an unsupported model_type raises an error
naming it — from the safetensors headers, before any weight is read or memory allocated. FP8 checkpoints
(DeepSeek-V3: e4m3 `.weight` + fp32 `.weight_scale_inv` per 128 x 128 block) load as they are on disk. Sharded
(tensor / expert parallel) models read only their slices (`shard` callable, `_Targets`).

Save: config.json (the original fields kept) + safetensors shards (with model.safetensors.index.json when more
than one) in the per-expert layout, which transformers loads.
"""

from __future__ import annotations

import json
import os
import re

import torch

from .config import load_config

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$")
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
    """Maps checkpoint names to destination tensors of a (possibly sharded) model.

    A sharded parameter says which part of the checkpoint tensor it holds (set by model/parallel.py):
    `_tp = (dim, rank, world)` — an equal split along `dim` of the checkpoint tensor (per expert for experts);
    `_ep = (first, count)` on fused expert tensors — the experts this rank holds. Everything else is whole."""

    def __init__(self, model):
        self.cfg = model.config
        self.rebind(model)
        self.marks = {k: (getattr(t, "_tp", None), getattr(t, "_ep", None)) for k, t in self.state.items()}
        self.sharded = any(tp or ep for tp, ep in self.marks.values())

    def rebind(self, model) -> None:
        """Point at the model's current tensors (materialising replaces the meta parameters; the marks stay)."""
        self.state = model.state_dict(keep_vars=True)
        if self.cfg.tie_word_embeddings:
            self.state.pop("lm_head.weight", None)

    def required(self) -> list[str]:
        """Every checkpoint name a complete per-expert checkpoint has (all experts, whichever rank holds them)."""
        names = []
        fused = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.experts.gate_up_proj_scale_inv",
                 "mlp.experts.down_proj_scale_inv")
        for k in self.state:
            if k.endswith(fused):
                p, _, w = k.rpartition(".")
                kind = "weight_scale_inv" if w.endswith("_scale_inv") else "weight"
                parts = ("gate_proj", "up_proj") if w.startswith("gate_up") else ("down_proj",)
                names += [f"{p}.{e}.{x}.{kind}" for e in range(self.cfg.num_experts) for x in parts]
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

    def dest(self, name: str):
        """-> (destination view, whether this rank holds it (else the view is another expert's: same shape and
        dtype), checkpoint slices or None for the whole tensor, the checkpoint tensor's expected shape, the
        required names it covers), or None for an unknown name."""
        m = _EXPERT.match(name)
        if m:
            p, e, w, kind = m.group(1), int(m.group(2)), m.group(3), m.group(4)
            key = f"{p}.{'down_proj' if w == 'down_proj' else 'gate_up_proj'}" + \
                ("_scale_inv" if kind == "weight_scale_inv" else "")
            t = self.state.get(key)
            if t is None or e >= self.cfg.num_experts:
                return None
            first, count = self.marks[key][1] or (0, t.shape[0])
            local = e - first
            data = t.data[min(max(local, 0), t.shape[0] - 1)]  # same shape for every expert (shape check)
            if w != "down_proj":
                half = data.shape[0] // 2
                data = data[:half] if w == "gate_proj" else data[half:]
            return data, 0 <= local < count, *self._slice(self.marks[key][0], data), [name]
        t = self.state.get(name)
        if t is None:
            return None
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            if self.sharded:
                raise ValueError(f"{name}: fused expert tensors cannot be split across ranks; save the checkpoint "
                                 "per expert (save_pretrained or model.quantize do)")
            p = name.rsplit(".", 1)[0]
            parts = ("gate_proj", "up_proj") if name.endswith("gate_up_proj") else ("down_proj",)
            return t.data, True, None, tuple(t.shape), [f"{p}.{e}.{w}.weight" for e in range(t.shape[0]) for w in parts]
        return t.data, True, *self._slice(self.marks[name][0], t.data), [name]

    @staticmethod
    def _slice(tp, data):
        """Tensor-parallel part: rank r of `world` holds slice r of the checkpoint tensor along `dim`
        (tp = (dim, rank, world) or None). -> (checkpoint slices or None, the checkpoint tensor's shape)."""
        if tp is None:
            return None, tuple(data.shape)
        dim, rank, world = tp
        n = data.shape[dim]
        src = [slice(None)] * data.dim()
        src[dim] = slice(rank * n, (rank + 1) * n)
        shape = list(data.shape)
        shape[dim] = n * world
        return tuple(src), tuple(shape)


_SAFETENSORS_FP8 = ("F8_E4M3", "F8_E5M2")


def _check_headers(targets: _Targets, headers: dict, path: str) -> None:
    """Every check that needs no tensor data, before any weight is read: unknown, missing, misshapen tensors,
    FP8 tensors where the config expects float (or the reverse)."""
    quant = targets.cfg.quant is not None
    unknown, covered = [], set()
    for name, (file, shape, dtype) in headers.items():
        d = targets.dest(name)
        if d is None:
            if not targets.ignorable(name):
                unknown.append(name)
            continue
        dst, _local, _src, want, covers = d
        covered.update(covers)
        if tuple(shape) != tuple(want):
            raise ValueError(f"{name}: shape {list(shape)} in {os.path.basename(file)}, the config needs {list(want)}")
        is_fp8 = dst.dtype == torch.float8_e4m3fn
        if dtype in _SAFETENSORS_FP8 and not is_fp8:
            why = "no quantization_config" if not quant else "this module in modules_to_not_convert"
            raise ValueError(f"{name}: {dtype} tensor, but the config has {why} (a float weight); add "
                             "quantization_config {quant_method: fp8, weight_block_size: [128, 128]} or "
                             "dequantise the checkpoint")
        if is_fp8 and dtype != "F8_E4M3":
            raise ValueError(f"{name}: {dtype} tensor, but quantization_config (fp8, e4m3) needs F8_E4M3")
    if unknown:
        raise ValueError(f"{len(unknown)} unexpected tensor(s) in the checkpoint (not part of a "
                         f"{targets.cfg.model_type} model with this config): {', '.join(unknown[:8])}")
    missing = [n for n in targets.required() if n not in covered]
    if missing:
        raise ValueError(f"{len(missing)} tensor(s) missing from the checkpoint at {path}: {', '.join(missing[:8])}")


def by_file(headers: dict) -> dict[str, list[str]]:
    """read_headers' names grouped by shard file (each file opened once)."""
    out: dict[str, list[str]] = {}
    for name, (file, _, _) in headers.items():
        out.setdefault(file, []).append(name)
    return out


def read_headers(path: str) -> dict[str, tuple[str, list[int], str]]:
    """name -> (shard file, shape, safetensors dtype) of every tensor, from the headers only (no data read)."""
    from safetensors import safe_open

    out = {}
    for file in _shard_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                sl = f.get_slice(name)
                out[name] = (file, sl.get_shape(), sl.get_dtype())
    return out


@torch.no_grad()
def load_pretrained(cls, path: str, dtype=None, device=None, shard=None):
    """Build `cls` from `<path>/config.json` and stream the safetensors weights into it.

    shard: optional callable(model) applied on the meta device before the weights are materialised (tensor /
    expert parallelism, model/parallel.py): it may replace modules and mark parameters with the part of the
    checkpoint they hold (_Targets); then each rank reads only its slices (safetensors get_slice). FP8 tensors and
    their weight_scale_inv are copied as they are (config quantization_config). Every check that needs no data
    (names, shapes, dtypes) runs on the headers before any weight is read."""
    from safetensors import safe_open

    cfg = load_config(path)
    if isinstance(dtype, str):
        dtype = _DTYPES[dtype]
    dtype = dtype or _DTYPES.get(str(cfg.dtype).replace("torch.", ""), torch.float32)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = cls(cfg)
    if shard is not None:
        shard(model)
    model.cast(dtype)  # still on meta: materialise once, directly in dtype
    targets = _Targets(model)
    headers = read_headers(path)
    _check_headers(targets, headers, path)  # before any weight is read (or memory allocated)
    model.to_empty(device=device)
    model.tie_weights()
    targets.rebind(model)
    for file, names in by_file(headers).items():
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in names:
                d = targets.dest(name)
                if d is None or not d[1]:  # ignorable, or held by another rank: never read
                    continue
                dst, _, src, _, _ = d
                dst.copy_(f.get_tensor(name) if src is None else f.get_slice(name)[src])
    return model.eval()


_FUSED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)(_scale_inv)?$")


def _hf_tensors(model):
    """Yields (checkpoint name, CPU tensor) in the per-expert layout, one tensor at a time (FP8 experts with
    their per-expert weight_scale_inv)."""
    state = model.state_dict()
    tied = model.config.tie_word_embeddings
    for k, t in state.items():
        if tied and k == "lm_head.weight":
            continue
        m = _FUSED.match(k)
        if not m:
            yield k, t
            continue
        p, w, kind = m.group(1), m.group(2), "weight_scale_inv" if m.group(3) else "weight"
        half = t.shape[1] // 2  # gate rows (or gate scale blocks), then up
        for e in range(t.shape[0]):
            if w == "down_proj":
                yield f"{p}.{e}.down_proj.{kind}", t[e]
            else:
                yield f"{p}.{e}.gate_proj.{kind}", t[e, :half]
                yield f"{p}.{e}.up_proj.{kind}", t[e, half:]


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

    write_shards(path, _hf_tensors(model), max_shard_bytes)


def write_shards(path: str, tensors, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write (name, tensor) pairs as safetensors shards of at most max_shard_bytes (model.safetensors when one fits,
    else model-0000i-of-0000n.safetensors + model.safetensors.index.json); each shard is written as soon as it is
    full, so host memory stays about one shard."""
    files, weight_map, cur, size, total = [], {}, {}, 0, 0

    def flush():
        nonlocal cur, size
        fname = f"model-{len(files) + 1:05d}.partial.safetensors"
        _write_shard(cur, os.path.join(path, fname))
        files.append(fname)
        weight_map.update({n: fname for n in cur})
        cur, size = {}, 0

    for name, t in tensors:
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
