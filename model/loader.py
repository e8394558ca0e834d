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
import math
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

    def region(self, name: str) -> tuple[str, tuple, list[str]] | None:
        """-> (state key, index into that full (unsharded) tensor, the required names it covers), or None for an
        unknown name. A per-expert tensor is one expert's rows of the fused tensor: (e, slice(0, I)) of gate_up_proj
        [E, 2I, H] (its weight_scale_inv: that expert's gate or up scale blocks of gate_up_proj_scale_inv)."""
        m = _EXPERT.match(name)
        if m:
            p, e, w, kind = m.group(1), int(m.group(2)), m.group(3), m.group(4)
            key = f"{p}.{'down_proj' if w == 'down_proj' else 'gate_up_proj'}" + \
                ("_scale_inv" if kind == "weight_scale_inv" else "")
            t = self.state.get(key)
            if t is None or e >= self.cfg.num_experts:
                return None
            if w == "down_proj":
                return key, (e,), [name]
            half = t.shape[1] // 2  # gate rows (or scale blocks), then up
            return key, (e, slice(0, half) if w == "gate_proj" else slice(half, 2 * half)), [name]
        t = self.state.get(name)
        if t is None:
            return None
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            p = name.rsplit(".", 1)[0]
            parts = ("gate_proj", "up_proj") if name.endswith("gate_up_proj") else ("down_proj",)
            return name, (), [f"{p}.{e}.{w}.weight" for e in range(t.shape[0]) for w in parts]
        return name, (), [name]

    def dest(self, name: str):
        """-> (destination view on this rank, whether this rank holds it (else the view is another expert's: same
        shape and dtype), checkpoint slices or None for the whole tensor, the checkpoint tensor's expected shape,
        the required names it covers), or None for an unknown name."""
        r = self.region(name)
        if r is None:
            return None
        key, index, covers = r
        t, (tp, ep) = self.state[key], self.marks[key]
        if not index:
            if len(covers) > 1 or covers[0] != name:  # a fused expert tensor
                if self.sharded:
                    raise ValueError(f"{name}: fused expert tensors cannot be split across ranks; save the "
                                     "checkpoint per expert (save_pretrained or model.quantize do)")
                return t.data, True, None, tuple(t.shape), covers
            return t.data, True, *self._slice(tp, t.data), covers
        first, count = ep or (0, t.shape[0])
        local = index[0] - first
        data = t.data[min(max(local, 0), t.shape[0] - 1)][index[1:]]  # same shape for every expert (shape check)
        return data, 0 <= local < count, *self._slice(tp, data), covers

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
    check_complete(targets, unknown, covered, path)


def check_complete(targets: _Targets, unknown: list[str], covered: set, path: str) -> None:
    """Raise naming the first unknown tensors of the checkpoint at `path`, else the first required names that no
    tensor covered."""
    if unknown:
        raise ValueError(f"{len(unknown)} unexpected tensor(s) in the checkpoint at {path} (not part of a "
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


def hf_split(key: str, t: torch.Tensor):
    """One state-dict tensor -> (checkpoint name, view) in the per-expert layout transformers reads (the fused
    experts.gate_up_proj [E, 2I, H] -> E gate_proj and up_proj [I, H]; down_proj [E, H, I] -> E [H, I]; an FP8
    model's gate_up_proj_scale_inv / down_proj_scale_inv likewise, as each expert's weight_scale_inv)."""
    m = _FUSED.match(key)
    if not m:
        yield key, t
        return
    p, w, kind = m.group(1), m.group(2), "weight_scale_inv" if m.group(3) else "weight"
    half = t.shape[1] // 2  # gate rows (or gate scale blocks), then up
    for e in range(t.shape[0]):
        if w == "down_proj":
            yield f"{p}.{e}.down_proj.{kind}", t[e]
        else:
            yield f"{p}.{e}.gate_proj.{kind}", t[e, :half]
            yield f"{p}.{e}.up_proj.{kind}", t[e, half:]


def _hf_tensors(model):
    """Yields (checkpoint name, tensor view) in the per-expert layout, one tensor at a time."""
    tied = model.config.tie_word_embeddings
    for k, t in model.state_dict().items():
        if not (tied and k == "lm_head.weight"):
            yield from hf_split(k, t)


_ST_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
             torch.float8_e4m3fn: "F8_E4M3"}
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
