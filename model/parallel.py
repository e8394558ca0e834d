"""Tensor and expert parallelism on torch.distributed (NCCL on GPUs, gloo on CPU), SPMD: every rank runs the same
program on the same inputs and gets the same outputs (`LLM(..., tensor_parallel_size=N,
enable_expert_parallel=True)` under `torchrun --nproc-per-node N`). As torchtitan does, the single-device model
(modeling.py) stays as it is; `parallelize(model, pc)` rewrites it on the meta device before any weight is
materialised — smaller modules, parameters marked with the part of the checkpoint they hold (`_tp`, `_ep`, read by
the loader, so each rank reads only its safetensors slices), and collectives where the layout needs them.

Layout (N ranks; docs/deepseek_v3_8xh200.md has the numbers for V3 on 8 x H200):
- Attention: heads split (tensor parallel). MLA: q_proj / q_b_proj and kv_b_proj by heads (column), o_proj by
  its input (row) + all-reduce; q_a_proj, kv_a_proj_with_mqa and the norms replicated, so every rank writes the
  same latent rows [c; k_pe] into its own cache (the latent is shared by all heads: it cannot be split by head).
  GQA: q by heads, k / v by KV heads, o row-parallel; each rank caches only its KV heads.
- Dense MLP layers: gate / up column-parallel, down row-parallel + all-reduce.
- LM head: vocabulary-parallel + all-gather of the logits. Embeddings replicated.
- MoE with enable_expert_parallel: routed experts split E/N per rank (rank r holds experts [r E/N, (r+1) E/N)). The
  hidden states are replicated after attention; rank r takes the r-th contiguous slice of the tokens, routes it (routing
  computed once per token), sends each (token, expert) pair to the rank holding the expert with an all-to-all of
  variable sizes (one exchange carrying the row, its local expert id and routing weight as bytes; FP8 rows + scales when
  the experts run W8A8: half the bytes), the experts apply the routing weight, results come back with the reverse
  all-to-all and are summed per token in slot order (deterministic); the shared experts (replicated) run on the same
  slice; an all-gather restores the replicated hidden states. Ranks with no tokens (decode with fewer tokens than ranks)
  or no pairs take part with empty buffers. `dispatch="all_gather"` is the fixed-shape variant for CUDA-graph capture
  (no host sync): routing ids and weights are all-gathered, each rank computes its experts' pairs over all tokens (the
  others are skipped, not computed), and an all-reduce sums the partial outputs; "auto" takes it for steps of up to
  STATIC_MAX_TOKENS tokens (decode: no host sync, and the warm-up before a CUDA-graph capture takes the path the
  capture records) and while a graph is captured, the all-to-all above.
- enable_dp_attention (the layout docs/deepseek_v3_8xh200.md recommends for V3 at long context): attention, dense
  MLPs, shared experts and the head replicated; each rank serves its own sequences with its own KV cache
  (dp_generate: prompt i on rank i % N, lockstep steps, idle ranks join the MoE exchanges with no tokens); the MoE
  all-to-all carries each rank's own tokens. Decode runs eagerly (no CUDA graphs) in this layout.
- MoE without expert parallelism: every expert's intermediate dimension split (column / row), shared experts
  likewise, one all-reduce.
FP8 weights split on 128 x 128 block boundaries only (their scales split with them); `check_parallel` refuses any
other split, and any world size that does not divide the heads, KV heads, experts or intermediate sizes, naming the
number, before any weight is read.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import dsmath_kernels as dk

from .config import ModelConfig
from .layers.attention import MLAttention
from .layers.fp8 import FP8Experts, FP8Linear, linear
from .layers.moe import MLP, Experts, MoE

BLOCK = 128
DISPATCH = ("auto", "all_to_all", "all_gather")
STATIC_MAX_TOKENS = 1024  # "auto": the fixed-shape exchange up to this many tokens per step (decode), all-to-all above


@dataclass(frozen=True)
class ParallelConfig:
    world: int                 # tensor_parallel_size (= world size of the group)
    rank: int
    expert_parallel: bool      # enable_expert_parallel
    dp_attention: bool = False  # enable_dp_attention: attention data-parallel (each rank its own sequences)
    # MoE token exchange: "all_to_all" (exact sizes), "all_gather" (fixed shapes), "auto" (all_gather for decode-sized
    # steps and under CUDA-graph capture); default from the environment variable DSMATH_MOE_DISPATCH, else "auto"
    dispatch: str = field(default_factory=lambda: os.environ.get("DSMATH_MOE_DISPATCH", "auto"))
    group: object = None       # process group (None: the default group)


def init_distributed(tensor_parallel_size: int, device=None, timeout=None) -> tuple[int, torch.device]:
    """Join (or start, from torchrun's environment) the default process group: NCCL on CUDA, gloo on CPU.
    Returns (rank, this rank's device). The world size must equal tensor_parallel_size. timeout: of every
    collective (a datetime.timedelta; torch's default when None)."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise RuntimeError(f"tensor_parallel_size={tensor_parallel_size}: run under torchrun --nproc-per-node "
                               f"{tensor_parallel_size} (or initialise torch.distributed first)")
        cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        dist.init_process_group("nccl" if cuda else "gloo", **({"timeout": timeout} if timeout else {}))
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size: {tensor_parallel_size}, but the process group has {world} ranks "
                         f"(torchrun --nproc-per-node {tensor_parallel_size})")
    if device is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()) \
            if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, device


# ---------------------------------------------------------------- checks (before any weight)

def check_parallel(cfg: ModelConfig, world: int, expert_parallel: bool, dp_attention: bool = False) -> None:
    """Every split must be even, and FP8 weights must split on 128 x 128 block boundaries: a ValueError naming the
    config field and the numbers otherwise."""
    if world < 1:
        raise ValueError(f"tensor_parallel_size: must be >= 1, got {world}")
    if dp_attention and not expert_parallel:
        raise ValueError("enable_dp_attention: needs enable_expert_parallel=True (the ranks exchange tokens only "
                         "in the MoE layers)")
    if world == 1:
        return
    if dp_attention:  # everything but the routed experts is replicated
        if any(cfg.moe_layers):
            if cfg.num_experts % world:
                raise ValueError(f"n_routed_experts: {cfg.num_experts} experts do not split across {world} ranks "
                                 "(tensor_parallel_size must divide it)")
        return
    fp8 = cfg.quant is not None

    def split(field: str, n: int, what: str, rows_each: int = 1, fp8_weight: bool = False):
        if n % world:
            raise ValueError(f"{field}: {n} {what} do not split across {world} ranks (tensor_parallel_size must "
                             f"divide it)")
        if fp8 and fp8_weight and (n // world * rows_each) % BLOCK:
            raise ValueError(f"{field}: {n // world} {what} per rank x {rows_each} = {n // world * rows_each} rows "
                             f"is not a multiple of the {BLOCK}-row FP8 block (FP8 weights split on block "
                             f"boundaries) with tensor_parallel_size={world}")

    H = cfg.num_attention_heads
    if cfg.is_mla:
        split("num_attention_heads", H, "heads", cfg.qk_head_dim, fp8_weight=True)  # q_proj / q_b_proj
        split("num_attention_heads", H, "heads", cfg.qk_nope_head_dim + cfg.v_head_dim, fp8_weight=True)  # kv_b
        split("num_attention_heads", H, "heads", cfg.v_head_dim, fp8_weight=True)  # o_proj input
    else:
        split("num_attention_heads", H, "heads", cfg.head_dim, fp8_weight=True)
        split("num_key_value_heads", cfg.num_key_value_heads, "KV heads", cfg.head_dim, fp8_weight=True)
    if not all(cfg.moe_layers):
        split("intermediate_size", cfg.intermediate_size, "channels", fp8_weight=True)
    if any(cfg.moe_layers):
        if expert_parallel:
            split("n_routed_experts", cfg.num_experts, "experts")
        else:
            split("moe_intermediate_size", cfg.moe_intermediate_size, "channels", fp8_weight=True)
            if cfg.n_shared_experts:
                split("moe_intermediate_size * n_shared_experts", cfg.moe_intermediate_size * cfg.n_shared_experts,
                      "channels", fp8_weight=True)
    if not cfg.tie_word_embeddings:
        split("vocab_size", cfg.vocab_size, "tokens")


# ---------------------------------------------------------------- collectives

def min_over_ranks(n: int, device, pc: ParallelConfig) -> int:
    """The smallest n over the ranks (e.g. KV-cache blocks: every rank's scheduler must see the same cache)."""
    t = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=pc.group)
    return int(t.item())


def _all_reduce(t: torch.Tensor, pc: ParallelConfig) -> torch.Tensor:
    dist.all_reduce(t, group=pc.group)
    return t


def _all_gather(t: torch.Tensor, pc: ParallelConfig) -> torch.Tensor:
    """[n, ...] from every rank -> [world * n, ...] in rank order (same n on every rank)."""
    out = t.new_empty(pc.world * t.shape[0], *t.shape[1:])
    if t.dtype == torch.float8_e4m3fn:  # not every backend moves e4m3: move the bytes
        dist.all_gather_into_tensor(out.view(torch.uint8), t.contiguous().view(torch.uint8), group=pc.group)
    else:
        dist.all_gather_into_tensor(out, t.contiguous(), group=pc.group)
    return out


def _all_to_all(t: torch.Tensor, recv: list[int], send: list[int], pc: ParallelConfig) -> torch.Tensor:
    """Rows [sum(send), ...] sent in rank order (send[j] rows to rank j) -> rows [sum(recv), ...] received."""
    out = t.new_empty(sum(recv), *t.shape[1:])
    if t.dtype == torch.float8_e4m3fn:
        dist.all_to_all_single(out.view(torch.uint8), t.contiguous().view(torch.uint8), recv, send, group=pc.group)
    else:
        dist.all_to_all_single(out, t.contiguous(), recv, send, group=pc.group)
    return out


def broadcast_from_rank0(out, pc: ParallelConfig) -> None:
    """Every tensor field of a sampler output (tokens, log-probs, ranks, top-k) takes rank 0's values, in place:
    the ranks' logits are equal (collectives give every rank the same sums), this makes the tokens equal by
    construction, so the schedulers can never diverge."""
    for name in ("tokens", "logprobs", "ranks", "top_ids", "top_values"):
        t = getattr(out, name, None)
        if isinstance(t, torch.Tensor):
            dist.broadcast(t, src=0, group=pc.group)


def any_rank(flag: bool, device, pc: ParallelConfig) -> bool:
    t = torch.tensor([int(flag)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=pc.group)
    return bool(t.item())


# ---------------------------------------------------------------- sharded modules

def _mark(t: torch.Tensor | None, **attrs) -> None:
    if t is not None:
        for k, v in attrs.items():
            setattr(t, k, v)


def _column(cfg: ModelConfig, in_f: int, out_local: int, pc: ParallelConfig, bias: bool = False) -> nn.Module:
    """Output features split: rank r holds rows [r n, (r+1) n) of the weight (and of its block scales, bias)."""
    m = linear(cfg, in_f, out_local, bias)
    for t in (m.weight, getattr(m, "weight_scale_inv", None), m.bias):
        _mark(t, _tp=(0, pc.rank, pc.world))
    return m


def _matmul(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x @ W.T without the bias (FP8 or float)."""
    if isinstance(m, FP8Linear):
        return dk.fp8_linear(x, m.weight, m.weight_scale_inv)
    return F.linear(x, m.weight)


def _row_forward(m: nn.Module, pc: ParallelConfig, reduce: bool, x: torch.Tensor) -> torch.Tensor:
    y = _matmul(m, x)  # partial sum over this rank's input features
    if reduce:
        _all_reduce(y, pc)
    return y if m.bias is None else y + m.bias  # the bias once, after the sum


def _row(cfg: ModelConfig, in_local: int, out_f: int, pc: ParallelConfig, bias: bool = False,
         reduce: bool = True) -> nn.Module:
    """Input features split: rank r holds columns [r n, (r+1) n); the partial outputs are all-reduced (unless the
    caller reduces a sum of several, reduce=False)."""
    m = linear(cfg, in_local, out_f, bias)
    for t in (m.weight, getattr(m, "weight_scale_inv", None)):
        _mark(t, _tp=(1, pc.rank, pc.world))
    m.forward = functools.partial(_row_forward, m, pc, reduce)
    return m


def _tp_mlp(mlp: MLP, cfg: ModelConfig, pc: ParallelConfig, reduce: bool = True) -> None:
    inter = mlp.gate_proj.out_features // pc.world
    hidden = mlp.gate_proj.in_features
    bias = mlp.gate_proj.bias is not None
    mlp.gate_proj = _column(cfg, hidden, inter, pc, bias)
    mlp.up_proj = _column(cfg, hidden, inter, pc, bias)
    mlp.down_proj = _row(cfg, inter, hidden, pc, bias, reduce)


def _tp_attention(attn: nn.Module, cfg: ModelConfig, pc: ParallelConfig) -> None:
    W, H, b = pc.world, cfg.hidden_size, cfg.attention_bias
    nh = attn.nh // W
    if isinstance(attn, MLAttention):
        dq = attn.dn + attn.dr
        if attn.low_rank_q:
            attn.q_b_proj = _column(cfg, attn.q_b_proj.in_features, nh * dq, pc)
        else:
            attn.q_proj = _column(cfg, H, nh * dq, pc)
        attn.kv_b_proj = _column(cfg, attn.dc, nh * (attn.dn + attn.dv), pc)
        attn.o_proj = _row(cfg, nh * attn.dv, H, pc, b)
    else:
        nkv = attn.nkv // W
        attn.q_proj = _column(cfg, H, nh * attn.d, pc, b)
        attn.k_proj = _column(cfg, H, nkv * attn.d, pc, b)
        attn.v_proj = _column(cfg, H, nkv * attn.d, pc, b)
        attn.o_proj = _row(cfg, nh * attn.d, H, pc, b)
        attn.nkv = nkv
    attn.nh = nh


def _lm_head_forward(m: nn.Linear, pc: ParallelConfig, x: torch.Tensor) -> torch.Tensor:
    y = F.linear(x, m.weight)  # [..., V / N]
    parts = _all_gather(y.reshape(-1, y.shape[-1]).T.contiguous(), pc)  # [V, rows]
    return parts.T.reshape(*y.shape[:-1], -1)


# ---------------------------------------------------------------- MoE

def _local_experts(cfg: ModelConfig, **change) -> nn.Module:
    c = dataclasses.replace(cfg, **change)
    return FP8Experts(c) if cfg.quant is not None else Experts(c)


def _expert_tensors(ex: nn.Module):
    return (ex.gate_up_proj, getattr(ex, "gate_up_proj_scale_inv", None), ex.down_proj,
            getattr(ex, "down_proj_scale_inv", None))


def _fp8_dispatch(ex: nn.Module, x: torch.Tensor) -> bool:
    """Dispatch e4m3 rows + scales (half the bytes) when the experts will quantise their input anyway."""
    return isinstance(ex, FP8Experts) and dk.fp8.resolve_activation("auto", x.device) == "fp8"


def _run_experts(ex: nn.Module, x, weights, ids, x_scale=None, out_dtype=None) -> torch.Tensor:
    w13, s13, w2, s2 = _expert_tensors(ex)
    return dk.fp8.experts_forward(x, w13, s13, w2, s2, weights, ids, "auto", x_scale=x_scale, out_dtype=out_dtype)


def _pack(cols: list[torch.Tensor]) -> torch.Tensor:
    """Row-wise concatenation of [P, n_i] tensors of any dtypes as bytes [P, sum n_i * size_i] (one exchange)."""
    return torch.cat([t.contiguous().view(torch.uint8) for t in cols], dim=1)


def _unpack(packed: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, at = [], 0
    for t in like:
        n = t.shape[1] * t.element_size()
        out.append(packed[:, at:at + n].contiguous().view(t.dtype))
        at += n
    return out


def _dispatch_all_to_all(moe: MoE, pc: ParallelConfig, xs: torch.Tensor, weights, ids) -> torch.Tensor:
    """Routed-expert output [Ts, H] of this rank's tokens xs [Ts, H] (routing weights / ids [Ts, K]), the pairs
    computed on the ranks holding their experts. One host sync (the exchange sizes)."""
    Ts, K = ids.shape
    n_local = moe.experts.gate_up_proj.shape[0]
    dest = (ids.long() // n_local).reshape(-1)  # [P] rank of each pair
    order = torch.sort(dest, stable=True).indices  # pairs grouped by destination rank, pair order inside
    send_counts = torch.bincount(dest, minlength=pc.world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=pc.group)
    counts = torch.stack([send_counts, recv_counts]).tolist()  # the host sync
    send, recv = counts
    tok = torch.div(order, K, rounding_mode="floor")
    fp8 = _fp8_dispatch(moe.experts, xs)
    rows = list(dk.quantize_fp8_groups(xs)) if fp8 else [xs]  # FP8: quantised once per token, before the exchange
    rows = [t[tok] for t in rows] + [(ids.reshape(-1)[order] % n_local).to(torch.int32)[:, None],  # local expert
                                     weights.reshape(-1)[order].float()[:, None]]  # routing weight
    recv_rows = _unpack(_all_to_all(_pack(rows), recv, send, pc), rows)  # one exchange for all of a pair's data
    rx, rs = (recv_rows[0], recv_rows[1]) if fp8 else (recv_rows[0], None)
    rid, rw = recv_rows[-2], recv_rows[-1]
    y = _run_experts(moe.experts, rx, rw, rid, x_scale=rs, out_dtype=xs.dtype)  # [R, H] weighted
    back = _all_to_all(y, send, recv, pc)  # [P, H] in `order`
    pairs = torch.empty_like(back)
    pairs[order] = back
    return pairs.view(Ts, K, xs.shape[1]).float().sum(dim=1).to(xs.dtype)  # slot order: deterministic


def _moe_ep_forward(moe: MoE, pc: ParallelConfig, x: torch.Tensor, routing: torch.Tensor | None = None,
                    return_routing: bool = False):
    """MoE.forward with experts split across ranks: x [..., H] -> [..., H] (and, with return_routing, the gate's
    own ids [..., K] of every token). The hidden states are replicated on every rank (heads-split attention: each
    rank routes its slice of the tokens) or, with data-parallel attention, this rank's own tokens (possibly none).
    routing [..., K]: routing replay (MoE.route)."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])  # [T, H]
    K = moe.gate.cfg.num_experts_per_tok
    routing = None if routing is None else routing.reshape(-1, routing.shape[-1])
    T, W = x.shape[0], pc.world
    mode = pc.dispatch
    if mode == "auto":  # decode-sized steps (and anything being captured) take the host-sync-free exchange, so the
        # warm-up before a CUDA-graph capture autotunes the kernels the capture will use
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        mode = "all_gather" if capturing or T <= STATIC_MAX_TOKENS else "all_to_all"
    if pc.dp_attention:
        weights, ids, own = moe.route(x, routing, return_routing)  # this rank's own tokens
        out = _dispatch_all_to_all(moe, pc, x, weights, ids)
        if moe.shared_experts is not None:
            out = out + moe.shared_experts(x)
    else:
        c = -(-T // W)  # tokens per rank (the last ranks may have fewer, or none)
        lo, hi = min(pc.rank * c, T), min((pc.rank + 1) * c, T)
        rs = None if routing is None else routing[lo:hi]
        weights, ids, own = moe.route(x[lo:hi], rs, return_routing)  # this rank's slice: routed once per token
        if own is not None:  # every rank returns every token's own ids
            own = _all_gather(F.pad(own, (0, 0, 0, c - own.shape[0])), pc)[:T]
        if mode == "all_gather":  # fixed shapes: no host sync, CUDA-graph safe
            out = _moe_ep_all_gather(moe, pc, x, weights, ids, c)
        else:
            out = _dispatch_all_to_all(moe, pc, x[lo:hi], weights, ids)
            if moe.shared_experts is not None:
                out = out + moe.shared_experts(x[lo:hi])
            out = _all_gather(F.pad(out, (0, 0, 0, c - out.shape[0])), pc)[:T]  # [T, H]
    out = out.view(shape)
    return (out, own.view(*shape[:-1], K)) if return_routing else out


def _moe_ep_all_gather(moe: MoE, pc: ParallelConfig, x: torch.Tensor, weights, ids, c: int) -> torch.Tensor:
    """Fixed-shape exchange (x [T, H] replicated, heads-split attention; weights / ids [<= c, K] of this rank's
    slice): the routing is all-gathered, every rank computes its experts' pairs over all tokens (the other pairs are
    skipped, not computed) and an all-reduce sums the partial outputs. -> [T, H]."""
    T, W = x.shape[0], pc.world
    n_local = moe.experts.gate_up_proj.shape[0]
    pad = c - ids.shape[0]  # slice rows past T: no token (their pairs are skipped below)
    weights = _all_gather(F.pad(weights, (0, 0, 0, pad)), pc)  # [W c, K] routing of every token
    ids = _all_gather(F.pad(ids, (0, 0, 0, pad), value=-1), pc)
    local = ids.long() - pc.rank * n_local
    mine = torch.where((ids >= 0) & (local >= 0) & (local < n_local), local, -1)  # others' pairs: skipped
    xa = F.pad(x, (0, 0, 0, W * c - T))  # [W c, H]
    out = _all_reduce(_run_experts(moe.experts, xa, weights, mine), pc)[:T]
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(x)
    return out


def _moe_tp_forward(moe: MoE, pc: ParallelConfig, x: torch.Tensor, routing: torch.Tensor | None = None,
                    return_routing: bool = False):
    """Experts and shared experts split along their intermediate dimension: one all-reduce of the sum."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    weights, ids, own = moe.route(x, routing, return_routing)
    out = moe.experts(x, weights, ids)
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(x)
    out = _all_reduce(out, pc).view(shape)
    return (out, own.view(*shape[:-1], own.shape[-1])) if return_routing else out


def _parallel_moe(moe: MoE, cfg: ModelConfig, pc: ParallelConfig) -> None:
    if pc.expert_parallel:
        n = cfg.num_experts // pc.world
        moe.experts = _local_experts(cfg, num_experts=n)
        for t in _expert_tensors(moe.experts):
            _mark(t, _ep=(pc.rank * n, n))
        moe.forward = functools.partial(_moe_ep_forward, moe, pc)
        return
    moe.experts = _local_experts(cfg, moe_intermediate_size=cfg.moe_intermediate_size // pc.world)
    w13, s13, w2, s2 = _expert_tensors(moe.experts)
    for t, dim in ((w13, 0), (s13, 0), (w2, 1), (s2, 1)):  # dims of the per-expert checkpoint tensors
        _mark(t, _tp=(dim, pc.rank, pc.world))
    if moe.shared_experts is not None:
        _tp_mlp(moe.shared_experts, cfg, pc, reduce=False)
    moe.forward = functools.partial(_moe_tp_forward, moe, pc)


def parallelize(model: nn.Module, pc: ParallelConfig) -> nn.Module:
    """Rewrite the single-device model (on the meta device, before loading) for rank pc.rank of pc.world:
    apply_tp (attention, dense MLPs, LM head), apply_ep (MoE layers). Returns the model (model.parallel = pc)."""
    cfg = model.config
    check_parallel(cfg, pc.world, pc.expert_parallel, pc.dp_attention)
    if pc.dispatch not in DISPATCH:
        raise ValueError(f"dispatch: expected one of {list(DISPATCH)}, got {pc.dispatch!r}")
    if pc.world > 1:
        if any(p.device.type != "meta" for p in model.parameters()):
            raise ValueError("model: parallelize a model on the meta device, before its weights are loaded")
        with torch.device("meta"):
            if not pc.dp_attention:  # data-parallel attention: attention, dense MLPs and the head replicated
                apply_tp(model, pc)
            apply_ep(model, pc)
    model.parallel = pc
    return model


def apply_tp(model: nn.Module, pc: ParallelConfig) -> None:
    """Heads split in every attention layer; dense MLPs column / row; the LM head by vocabulary."""
    cfg = model.config
    for layer in model.model.layers:
        _tp_attention(layer.self_attn, cfg, pc)
        if isinstance(layer.mlp, MLP):
            _tp_mlp(layer.mlp, cfg, pc)
    if not cfg.tie_word_embeddings:
        head = nn.Linear(cfg.hidden_size, cfg.vocab_size // pc.world, bias=False)
        _mark(head.weight, _tp=(0, pc.rank, pc.world))
        head.forward = functools.partial(_lm_head_forward, head, pc)
        model.lm_head = head
    if not cfg.is_mla:  # each rank caches its KV heads only
        model.config = dataclasses.replace(cfg, num_key_value_heads=cfg.num_key_value_heads // pc.world)


def apply_ep(model: nn.Module, pc: ParallelConfig) -> None:
    """Every MoE layer: experts split across ranks (expert_parallel) or along their intermediate dimension."""
    for layer in model.model.layers:
        if isinstance(layer.mlp, MoE):
            _parallel_moe(layer.mlp, model.config, pc)


# ---------------------------------------------------------------- data-parallel attention (engine side)

def idle_forward(model: nn.Module, pc: ParallelConfig) -> None:
    """A rank with no sequence this step still takes part in every MoE layer's exchange (with no tokens): the
    only collectives of a data-parallel-attention forward."""
    H = model.config.hidden_size
    x = torch.empty(0, H, dtype=model.dtype, device=model.device)
    with torch.inference_mode():
        for layer in model.model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp(x)


def dp_generate(llm, prompts, params) -> list:
    """LLM.generate with data-parallel attention: prompt i is served by rank i % N (its own scheduler, KV cache and
    sampling); every rank steps in lockstep — a real forward when it has work, idle_forward otherwise — until no
    rank has work, then all outputs are gathered, so every rank returns every RequestOutput, in order. Every rank
    validates every prompt, so a request that cannot be served fails the same way everywhere."""
    from .engine.checks import RequestError
    from .engine.llm_engine import Request, _as_prompt_list

    pc = llm.parallel
    prompts = _as_prompt_list(prompts)
    plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    if len(plist) != len(prompts):
        raise ValueError(f"sampling_params: {len(plist)} SamplingParams for {len(prompts)} prompts")
    made = []
    for i, (p, sp) in enumerate(zip(prompts, plist)):
        try:
            made.append(llm._make_request(p, sp, f"prompts[{i}]"))
        except RequestError as e:
            made.append((p, sp, e))
    mine = {i: llm._enqueue(r) if isinstance(r, Request) else llm._fail(*r)
            for i, r in enumerate(made) if i % pc.world == pc.rank}
    while any_rank(llm.has_unfinished(), llm.device, pc):
        if llm.has_unfinished():
            llm.step()
        else:
            idle_forward(llm.model, pc)
    local = [(i, llm.finished.pop(rid)) for i, rid in mine.items()]
    gathered = [None] * pc.world
    dist.all_gather_object(gathered, local, group=pc.group)
    by_index = dict(pair for part in gathered for pair in part)
    return [by_index[i] for i in range(len(prompts))]


# ---------------------------------------------------------------- serving (dsmath serve under torchrun)

class Leader:
    """Rank 0's engine when `dsmath serve` runs tensor parallel: the LLM as AsyncLLM drives it, except that every
    change of engine state (a request queued, a request aborted, a step) is first sent to the other ranks, which
    replay it (`follow`) — so every rank runs the same steps on the same requests, as SPMD needs."""

    def __init__(self, llm):
        self.llm, self._ops = llm, []

    def __getattr__(self, name):
        return getattr(self.llm, name)

    def _enqueue(self, req, stream_text: bool = False) -> int:
        self._ops.append(("add", req, stream_text))
        return self.llm._enqueue(req, stream_text)

    def abort(self, request_id: int) -> None:
        self._ops.append(("abort", request_id))
        self.llm.abort(request_id)

    def compute_step(self):
        self._send(("step",))
        return self.llm.compute_step()

    def stop(self) -> None:
        """Release the followers (after the server drained)."""
        self._send(("stop",))

    def _send(self, last: tuple) -> None:
        ops, self._ops = [*self._ops, last], []
        dist.broadcast_object_list([ops], src=0, group=self.llm.parallel.group)


def follow(llm) -> None:
    """Ranks > 0 under `dsmath serve`: replay rank 0's requests, aborts and steps until it says stop."""
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=llm.parallel.group)
        for op in box[0]:
            if op[0] == "add":
                llm._enqueue(op[1], op[2])
            elif op[0] == "abort":
                llm.abort(op[1])
            elif op[0] == "step":
                llm.process_step(llm.compute_step())
                llm.finished.clear()  # rank 0 answers the clients
            elif op[0] == "stop":
                return
