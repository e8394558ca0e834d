"""GRPO for math with verifiable rewards — DeepSeekMath's recipe as one readable loop.

Algorithm (Shao et al. 2024, "DeepSeekMath", section 4), one step:
  1. take P problems; the engine samples G completions of each on the current policy (its rollout copy of the
     weights, refreshed from the policy before every rollout) and returns each token's log-prob and (MoE) the
     experts it was routed to — replayed in every trainer forward (routing_replay), see train/README.md
     "Log-probs that match";
  2. reward r = math_reward(completion, gold) (+ optional format / overlong terms);
  3. advantages A_i = (r_i - mean(r_group)) / (std(r_group) + eps), the same for every token of completion i;
  4. old log-probs (trainer forward, no grad; the engine's where they are the same by construction:
     skip_recompute) with truncated importance weights against the engine's (tis_cap) and, if beta > 0, reference
     log-probs from a frozen copy of the starting policy;
  5. mu passes over the batch in `minibatches` optimizer steps of
        loss = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * KL_k3(pi || ref)
     averaged per `loss_type` (dsmath_kernels.grpo_loss: fused LM head + log-softmax, never the [B*T, V] logits),
     AdamW, gradient clipping at `grad_clip`, linear warm-up then constant or cosine LR.

Defaults are DeepSeekMath's (G = 64, beta = 0.04, lr 1e-6, eps 0.2, one policy update per sampling round,
per-sequence mean). Options: DAPO (`--config dapo`: clip-higher 0.2/0.28, token-level mean, dynamic sampling —
groups all correct or all wrong dropped and new problems sampled until the batch is full —, soft overlong penalty,
optional overlong filtering, no KL) and Dr. GRPO (`--config dr_grpo`: no std division, sum over tokens divided by
a constant B * max_tokens, no KL).

Departures from the paper:
  - outcome rewards only (no process supervision; no reward model — the reward is the verifier);
  - DAPO's dynamic sampling gives up after max_resample_rounds extra rounds (then trains on fewer informative
    groups, the rest masked);
  - the reference model is the policy at step 0 of THIS run (after an optional warm start), in the compute dtype,
    sharded like the policy; no periodic reference reset (DeepSeekMath's iterative RL);
  - precision (train/README.md): fp32 master weights always; compute in `dtype` (bf16 by default on CUDA, fp32 on a
    CPU): FSDP2 mixed precision under torchrun, autocast in one process; rollouts on a copy in the compute dtype.

Launch:
    python -m train.grpo --config toy --out runs/toy                      # CPU proof, < 10 min on 2 cores
    python -m train.grpo --model CKPT --data ../shared/data/gsm8k/test.jsonl --dataset gsm8k --out runs/gsm
    torchrun --nproc-per-node 8 -m train.grpo --config dapo --model CKPT --data train.jsonl --out runs/dapo
    python -m train.plot runs/toy                                          # reward, KL, length curves

    python -m train.grpo --plan-memory --model v2-lite --world-size 8      # per-rank memory plan, nothing runs

At scale (torchrun): the models are built on the meta device and sharded with FSDP2 (`fully_shard` per decoder
layer, DeepSeek's fp32 routers, and the root); each rank allocates only its shards and reads only their slices of
the safetensors checkpoint (model/sharded_load.py) — no full copy anywhere. Each rank samples its share of the P
problems (P divisible by the world size) on the engine's bf16 rollout copy, filled layer by layer from the shards
and freed with the KV cache after the rollout (LLM.sleep / wake_up); the loss is normalised by global counts so
gradients equal a single process's on the same data.
Outputs in OUT: metrics.jsonl (one JSON object per step, with per-rank peak memory), ckpt/step_N/ (DCP shards of the
fp32 master weights and AdamW state, config.json, tokenizer, trainer_state.pt; resumable at any world size),
ref/ (reference shards), hf/step_N/ (the final checkpoint exported for transformers and our LLM: train/export.py),
memory.json (per-rank load and run peaks).
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn

from ._pkg import model_module
from .config import GRPOConfig, parse_config
from .data import ProblemSampler, fewshot_for, load_problems, prompt_ids
from .rewards import VerifyPool, format_reward, length_penalty, math_rewards

# ---------------------------------------------------------------------------------------------------------------
# The policy: the LM and its loss in one module, so FSDP2 un-shards lm_head.weight inside forward


class Policy(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids, targets, mask=None, adv=None, old=None, ref=None, cfg: GRPOConfig | None = None, *,
                routing=None, replay: bool = False, agreement: bool = False, token_weights=None):
        """ids/targets [B, T]. Without `adv`: (token log-probs [B, T], agree). With it: (grpo loss, metrics).
        routing [B, T, L, K]: the engine's experts — used instead of the gates' top-k when `replay`; with
        `agreement`, agree = [B, T] bool (every layer's experts equal the engine's; metrics["router_agreement"] in
        loss mode), else None. token_weights [B, T]: TIS weights of the policy-gradient term."""
        from dsmath_kernels import grpo_loss, token_logprobs

        out = self.lm(ids, return_hidden=True, routing=routing if replay else None, return_routing=agreement)
        hidden = out.hidden  # [B, T, H]
        agree = same_experts(out.routing, routing) if agreement else None  # [B, T]
        w = self.lm.lm_head.weight  # [V, H]
        if adv is None:
            return token_logprobs(hidden, w.to(hidden.dtype), targets, temperature=cfg.temperature), agree
        loss, met = grpo_loss(hidden, w.to(hidden.dtype), targets, mask, adv, old_logprobs=old, ref_logprobs=ref,
                              beta=cfg.beta, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                              temperature=cfg.temperature, loss_type=cfg.loss_type, token_weights=token_weights)
        if agree is not None:
            met["router_agreement"] = (agree & mask).sum() / mask.sum().clamp(min=1)
        return loss, met


def same_experts(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, T, L, K] x 2 -> [B, T] bool: the same set of experts in every layer (order within a row ignored)."""
    return (a.sort(dim=-1).values == b.to(a.dtype).sort(dim=-1).values).flatten(2).all(dim=-1)


def fsdp_modules(policy) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in policy.modules() if isinstance(m, FSDPModule)]


def compute_dtype(cfg: GRPOConfig) -> torch.dtype:
    """The dtype of compute, the rollout copy and the reference (the policy's master weights stay float32)."""
    return torch.bfloat16 if (cfg.dtype or default_dtype()) == "bfloat16" else torch.float32


def checkpointing_on(cfg: GRPOConfig) -> bool:
    """Activation checkpointing: as configured; by default on with CUDA (see --plan-memory), off on a CPU."""
    return torch.cuda.is_available() if cfg.activation_checkpointing is None else cfg.activation_checkpointing


def default_dtype() -> str:
    return "bfloat16" if torch.cuda.is_available() else "float32"


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def shard(policy: Policy, cfg: GRPOConfig, *, reference: bool = False) -> None:
    """FSDP2: one group per decoder layer, one for the embeddings (unless tied to the LM head), and the root (final
    norm, LM head: used in Policy.forward); DeepSeek's float32 routers get their own small group, so they are
    gathered and used in float32 (FSDP2 needs one dtype per group, and transformers keeps gate.weight float32 too).

    Mixed precision (train/README.md): the policy's float32 shards are the master weights; a group's forward and
    backward run on a bfloat16 all-gather (param_dtype) and gradients are reduce-scattered in float32
    (reduce_dtype), so the optimizer updates float32 shards with float32 gradients. The reference already holds
    bfloat16 weights (no cast) and, with cfg.ref_offload on CUDA, keeps its shards in pinned host memory."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    mesh = init_device_mesh(device().type, (dist.get_world_size(),))
    low = compute_dtype(cfg) == torch.bfloat16 and not reference
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if low else \
        MixedPrecisionPolicy()
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32) if low else mp
    offload = CPUOffloadPolicy() if reference and cfg.ref_offload and torch.cuda.is_available() else OffloadPolicy()
    if not policy.lm.config.tie_word_embeddings:  # its own group: the root (final norm, LM head) gathers half as much
        fully_shard(policy.lm.model.embed_tokens, mesh=mesh, mp_policy=mp, offload_policy=offload)
    for layer in policy.lm.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if policy.lm.config.router_fp32 and gate is not None:
            fully_shard(gate, mesh=mesh, mp_policy=fp32, offload_policy=offload)
            register_fsdp_forward_method(gate, "logits")  # MoE calls gate.logits(x), not gate(x)
        fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=offload)
    fully_shard(policy, mesh=mesh, mp_policy=mp, offload_policy=offload,
                reshard_after_forward=True if reference else None)  # the reference never runs a backward


def fsdp_units(policy: Policy) -> list[tuple[nn.Module | None, list[str]]]:
    """[(FSDP module, names in policy.lm of the parameters it gathers)], inner groups first; one (None, all names)
    entry for an unsharded policy."""
    names = [n for n, _ in policy.lm.named_parameters()]
    if not fsdp_modules(policy):
        return [(None, names)]
    prefix = {m: (n + "." if n else "") for n, m in policy.named_modules() if m in set(fsdp_modules(policy))}
    units = sorted(prefix, key=lambda m: -len(prefix[m]))  # deepest first: each name goes to its innermost group
    owned, taken = {m: [] for m in units}, set()
    for m in units:
        for n in names:
            if n not in taken and ("lm." + n).startswith(prefix[m]):
                owned[m].append(n)
                taken.add(n)
    return [(m, owned[m]) for m in units if owned[m]]


# ---------------------------------------------------------------------------------------------------------------
# Setup


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def load_tokenizer(cfg: GRPOConfig, model_dir: str | None):
    if cfg.tokenizer == "char":
        from .toy import char_tokenizer

        return char_tokenizer()
    from transformers import AutoTokenizer

    path = cfg.tokenizer or model_dir
    if path is None:
        raise ValueError("tokenizer: a preset model needs --tokenizer DIR (or 'char')")
    return AutoTokenizer.from_pretrained(path)


def model_config(cfg: GRPOConfig):
    """The policy's ModelConfig: from cfg.model's config.json (a directory) or a preset with model_overrides."""
    presets = model_module("presets")
    if os.path.isdir(cfg.model):
        return model_module("config").load_config(cfg.model)
    if cfg.model not in presets.PRESETS:
        raise ValueError(f"model: {cfg.model!r} is neither a directory nor a preset ({', '.join(presets.PRESETS)})")
    overrides = json.loads(cfg.model_overrides) if cfg.model_overrides else {}
    return presets.preset(cfg.model, **overrides)


def lm_on_meta(mcfg, dtype: torch.dtype):
    """MoEForCausalLM on the meta device (no memory), cast to dtype (DeepSeek routers stay float32)."""
    with torch.device("meta"):
        lm = model_module().MoEForCausalLM(mcfg)
    return lm.cast(dtype)


def materialize(module: nn.Module, offload: bool = False) -> None:
    """Allocate (uninitialised) what this rank holds: its FSDP2 shards, or everything in one process. With CPU
    offload the shards live in host memory and only the buffers (DeepSeek-V3's routing bias) go to the GPU."""
    module.to_empty(device="cpu" if offload else device())
    if offload:
        for mod in module.modules():
            for k, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[k] = b.to(device())
    if not fsdp_modules(module):
        lm = module.lm if isinstance(module, Policy) else module
        lm.tie_weights()


def fill_from_source(lm, cfg: GRPOConfig, index: dict | None) -> None:
    """This rank's slices of the starting weights: read from the checkpoint (index from check_checkpoint), or a
    preset's random init drawn row by row (the same values at every world size)."""
    sl = model_module("sharded_load")
    if index is not None:
        sl.load_sharded(lm, cfg.model, index)
    else:
        sl.init_sharded(lm, seed=cfg.seed, std=cfg.init_std)


@torch.no_grad()
def copy_shards(dst: nn.Module, src: nn.Module) -> None:
    """Copy src's parameters and buffers into dst's, shard for shard (same architecture and sharding; dst's dtype)."""
    from torch.distributed.tensor import DTensor

    local = lambda t: t.to_local() if isinstance(t, DTensor) else t.data
    d = dict(dst.named_parameters()) | dict(dst.named_buffers())
    for name, t in list(src.named_parameters()) + list(src.named_buffers()):
        local(d[name]).copy_(local(t))


def load_data(cfg: GRPOConfig):
    if cfg.data == "toy":
        from .toy import toy_problems

        return toy_problems(cfg.toy_max_operand)
    return load_problems(cfg.data, cfg.dataset, cfg.problem_key, cfg.answer_key)


def prompt_of(problem: str, tokenizer, cfg: GRPOConfig) -> list[int]:
    """The prompt token ids of a problem: train.data.prompt_ids, the function train.eval uses, in cfg's style."""
    return prompt_ids(problem, tokenizer, cfg.prompt, cfg.system, cfg.template_kwargs(),
                      fewshot=cfg.fewshot or fewshot_for(cfg.dataset))


def fit_prompts(problems: list, tokenizer, cfg: GRPOConfig) -> list:
    """The problems whose prompt fits in cfg.max_prompt_length tokens; the others are skipped, and how many is
    logged (rank 0) and written to OUT/prompts.json. Only when none fits is it an error (nothing to train on)."""
    lengths = [len(prompt_of(p.problem, tokenizer, cfg)) for p in problems]
    kept = [p for p, n in zip(problems, lengths) if n <= cfg.max_prompt_length]
    skipped = len(problems) - len(kept)
    if rank_world()[0] == 0:
        info = {"problems": len(problems), "skipped_long_prompts": skipped, "max_prompt_length": cfg.max_prompt_length,
                "longest_prompt": max(lengths, default=0), "prompt_style": cfg.prompt}
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "prompts.json"), "w") as f:
            json.dump(info, f, indent=1)
        if skipped:
            print(f"grpo: skipped {skipped} of {len(problems)} problems whose prompt is longer than "
                  f"max_prompt_length={cfg.max_prompt_length} tokens (longest: {info['longest_prompt']})",
                  file=sys.stderr)
    if not kept:
        raise ValueError(f"max_prompt_length: every prompt is longer than {cfg.max_prompt_length} tokens "
                         f"(shortest: {min(lengths)})")
    return kept


def lr_factor(step: int, cfg: GRPOConfig) -> float:
    """Linear warm-up over warmup_steps, then constant or cosine down to min_lr_ratio (step counts from 0)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


# ---------------------------------------------------------------------------------------------------------------
# One step: sample -> score -> pack


def sample(llm, prompts: list[list[int]], cfg: GRPOConfig, step: int, first_index: int):
    """G completions per prompt, each request seeded from (seed, step, global problem index): the same samples
    whatever the batch composition or the number of ranks. With an engine that records routing (MoE policies) the
    completions also carry each token's experts (CompletionOutput.routing), for replay and router agreement."""
    SamplingParams = model_module("engine").SamplingParams

    routing = bool(getattr(llm, "record_routing", False))
    params = [SamplingParams(n=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p,
                             max_tokens=cfg.max_tokens, logprobs=0, logprobs_mode="processed_logprobs",
                             return_routing=routing,
                             seed=(cfg.seed * 1_000_003 + step * 10_007 + first_index + i) % 2**62)
              for i in range(len(prompts))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [o for r in outs for o in r.outputs]  # P*G, groups contiguous


def score(completions, golds: list[str], tokenizer, pool, cfg: GRPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (reward [N], correct [N]) float32."""
    texts = [c.text if c.text is not None else tokenizer.decode(c.token_ids, skip_special_tokens=True)
             for c in completions]
    correct = torch.tensor(math_rewards(texts, golds, pool=pool))
    reward = correct.clone()
    if cfg.format_weight:
        reward += cfg.format_weight * torch.tensor([format_reward(t) for t in texts])
    if cfg.overlong_buffer:
        reward += torch.tensor([length_penalty(len(c.token_ids), cfg.max_tokens, cfg.overlong_buffer)
                                for c in completions])
    return reward, correct


def pack(prompts: list[list[int]], completions: list, pad: int, device) -> dict:
    """Rows prompt + completion, right-padded. The model reads ids = row[:-1] and predicts targets = row[1:];
    mask marks the completion tokens; engine_lp holds their sampled log-probs; routing [N, T, L, K] (when the
    completions carry it) the engine's experts for each input token — padding positions get experts 0..K-1."""
    rows = [p + list(c.token_ids) for p, c in zip(prompts, completions)]
    T = max(map(len, rows)) - 1
    ids = torch.full((len(rows), T + 1), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    engine_lp = torch.zeros(len(rows), T)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n = len(c.token_ids)
        ids[i, : len(p) + n] = torch.tensor(p + list(c.token_ids))
        mask[i, len(p) - 1 : len(p) - 1 + n] = True
        engine_lp[i, len(p) - 1 : len(p) - 1 + n] = torch.tensor(c.token_logprobs)
    b = {"ids": ids[:, :-1].to(device), "targets": ids[:, 1:].to(device), "mask": mask.to(device),
         "engine_lp": engine_lp.to(device)}
    if completions and getattr(completions[0], "routing", None) is not None:
        r0 = completions[0].routing  # [n, L, K] on the engine's device (no host round trip)
        routing = torch.arange(r0.shape[-1], dtype=r0.dtype, device=r0.device).expand(len(rows), T, *r0.shape[1:])
        routing = routing.clone()
        for i, c in enumerate(completions):
            routing[i, : c.routing.shape[0]] = c.routing
        b["routing"] = routing.to(device)
    return b


def micro_slices(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def trim(b: dict, rows: slice) -> dict:
    """Rows of the batch, cut to their longest completion (less padding per micro batch)."""
    sub = {k: v[rows] for k, v in b.items()}
    T = int(sub["mask"].any(0).nonzero().max()) + 1 if sub["mask"].any() else 1
    return {k: (v[:, :T] if v.dim() >= 2 else v) for k, v in sub.items()}


def autocast(cfg: GRPOConfig):
    if compute_dtype(cfg) == torch.bfloat16 and not dist.is_initialized():  # FSDP2 casts by itself
        return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def logprobs_of(policy: Policy, b: dict, cfg: GRPOConfig, replay: bool = False,
                agreement: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token log-probs [N, T] of the batch under `policy` (replaying b["routing"] when `replay`) and, with
    `agreement`, [N, T] bool: the trainer's own experts equal the engine's in every layer."""
    out = torch.zeros_like(b["engine_lp"])
    agree = torch.zeros_like(b["mask"]) if agreement else None
    for s in micro_slices(b["ids"].shape[0], cfg.micro_batch):
        m = trim(b, s)
        with autocast(cfg):
            lp, ag = policy(m["ids"], m["targets"], cfg=cfg, routing=m.get("routing"), replay=replay,
                            agreement=agreement)
        out[s, : m["ids"].shape[1]] = lp.float()
        if agreement:
            agree[s, : m["ids"].shape[1]] = ag
    reshard_root(policy)
    return out, agree


def reshard_root(policy: Policy) -> None:
    """FSDP2 keeps the root group (embeddings, LM head) gathered after a forward, for the backward that usually
    follows; after a no-grad pass nothing follows, so free it (0.5x the model's bf16 size at V2-Lite's vocab)."""
    if fsdp_modules(policy):
        policy.reshard()


# ---------------------------------------------------------------------------------------------------------------
# The policy update


def all_sum(x: float, op=None) -> float:
    if not dist.is_initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return float(t.item())


def all_max(x: float) -> float:
    return all_sum(x, dist.ReduceOp.MAX) if dist.is_initialized() else x


METRIC_KEYS = ("kl", "clip", "clip_low", "clip_high", "entropy")
MEASURE_KEYS = ("log_ratio_abs", "router_agreement")  # token means, when measured (first pass of a skipped recompute)


def backward_minibatch(policy: Policy, b: dict, rows: slice, cfg: GRPOConfig, stats: dict, *, replay: bool = False,
                       measure: bool = False) -> None:
    """Accumulate the gradient of one optimizer step's loss over `rows` of b (in micro batches). Every rank runs
    the same number of micro batches (FSDP all-gathers in each); dropped groups are masked out, not removed.
    b may hold routing (replayed when `replay`) and tis (per-token weights of the policy-gradient term). `measure`:
    also sum |logp - old| (mean and max) and, with routing, the router agreement into stats["first/..."]."""
    live = b["mask"][rows].any(1)
    n_seq, n_tok = all_sum(float(live.sum())), all_sum(float(b["mask"][rows].sum()))
    for s in micro_slices(rows.stop - rows.start, cfg.micro_batch):
        m = trim(b, slice(rows.start + s.start, rows.start + s.stop))
        with autocast(cfg):
            loss, met = policy(m["ids"], m["targets"], m["mask"], m["adv"], m.get("old"), m.get("ref"), cfg=cfg,
                               routing=m.get("routing"), replay=replay, agreement=measure and "routing" in m,
                               token_weights=m.get("tis"))
        scale = loss_scale(m, cfg, max(n_seq, 1.0), max(n_tok, 1.0))
        (loss * scale).backward()
        k = float(m["mask"].sum())
        stats["tokens"] = stats.get("tokens", 0.0) + k
        stats["objective"] = stats.get("objective", 0.0) + float(loss.detach()) * scale / rank_world()[1]
        for key in METRIC_KEYS:
            stats[key] = stats.get(key, 0.0) + float(met[key]) * k
        if measure:
            for key in ("tokens",) + MEASURE_KEYS:
                if key == "tokens" or key in met:
                    stats["first/" + key] = stats.get("first/" + key, 0.0) + (k if key == "tokens" else
                                                                                float(met[key]) * k)
            mx = stats.get("first/log_ratio_abs_max", 0.0)
            stats["first/log_ratio_abs_max"] = max(mx, float(met["log_ratio_abs_max"]))


def loss_scale(m: dict, cfg: GRPOConfig, n_seq: float, n_tok: float) -> float:
    """Turn grpo_loss's micro-batch mean into this micro batch's share of the optimizer step's loss over ALL ranks
    (FSDP averages gradients over ranks, hence * world). n_seq counts live (unmasked) sequences."""
    world = rank_world()[1]
    B, T = m["mask"].shape
    if cfg.loss_type == "grpo":  # mean over live sequences of their token means (masked rows add 0)
        return B / n_seq * world
    if cfg.loss_type == "dapo":  # token mean over the step
        return float(m["mask"].sum()) / n_tok * world
    return B * T / (n_seq * cfg.max_tokens) * world  # dr_grpo: token sum / (sequences * max_tokens)


def policy_update(policy: Policy, opt, b: dict, cfg: GRPOConfig, *, replay: bool = False) -> dict:
    """mu passes x `minibatches` optimizer steps over the batch b (ids, targets, mask, adv, old, ref, routing, tis).
    Also returns "first_pass": the first minibatch's mean / max |logp - old| before any update (with old = the
    engine's log-probs: the sampler-trainer gap) and its router agreement (when b has routing)."""
    N = b["ids"].shape[0]
    params = [p for p in policy.parameters() if p.requires_grad]
    stats, norms = {}, []
    for _ in range(cfg.mu):
        for rows in micro_slices(N, -(-N // cfg.minibatches)):
            opt.zero_grad(set_to_none=True)
            backward_minibatch(policy, b, rows, cfg, stats, replay=replay, measure=not norms)
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            norms.append(float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn))
            opt.step()
    first = {k.removeprefix("first/"): stats.pop(k) for k in list(stats) if k.startswith("first/")}
    tokens = all_sum(stats.pop("tokens"))
    loss = all_sum(stats.pop("objective")) / len(norms)  # the optimised loss, averaged over optimizer steps
    t1 = max(all_sum(first.pop("tokens")), 1.0)
    mx = all_max(first.pop("log_ratio_abs_max"))
    return {"loss": loss, **{k: all_sum(v) / max(tokens, 1.0) for k, v in stats.items()},
            "grad_norm": sum(norms) / len(norms),
            "first_pass": {**{k: all_sum(v) / t1 for k, v in first.items()}, "log_ratio_abs_max": mx}}


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


TRAINER_STATE = "trainer_state.pt"  # written last: its presence marks a complete, resumable checkpoint


def latest_checkpoint(out: str) -> str | None:
    f = os.path.join(out, "ckpt", "latest")
    if not os.path.exists(f):
        return None
    d = os.path.join(out, "ckpt", open(f).read().strip())
    return d if os.path.exists(os.path.join(d, TRAINER_STATE)) else None


def _dcp_state(policy: Policy, opt) -> dict:
    """{"model", "optim"}: this rank's shards (DTensors under FSDP2), in place — DCP reads and writes them."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(policy, opt)
    return {"model": model_sd, "optim": optim_sd}


def save_checkpoint(policy, opt, sched, sampler, tokenizer, step: int, cfg: GRPOConfig) -> str:
    """ckpt/step_N/: torch.distributed.checkpoint of the float32 master weights and the AdamW state, each rank
    writing its own shards (no gather anywhere), + config.json and the tokenizer (for train.export) + trainer_state.pt
    (LR schedule, data position, RNG; rank 0). Keeps the last cfg.keep_checkpoints. -> the directory."""
    rank, _ = rank_world()
    root = os.path.join(cfg.out, "ckpt")
    d = os.path.join(root, f"step_{step:06d}")
    if rank == 0 and os.path.exists(d):  # a killed run's partial directory of the same step
        shutil.rmtree(d)
    _barrier()
    dcp_io("save", _dcp_state(policy, opt), d)
    if rank == 0:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(policy.lm.config.to_dict(), f, indent=2, sort_keys=True)
        tokenizer.save_pretrained(d)
        gen = os.path.join(cfg.model, "generation_config.json")
        if os.path.isfile(gen):  # the source model's sampling defaults travel to the export
            shutil.copy(gen, d)
        state = {"step": step, "world_size": rank_world()[1], "scheduler": sched.state_dict(),
                 "compute_dtype": str(compute_dtype(cfg)).replace("torch.", ""),
                 "sampler": sampler.state_dict(), "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                 "config": asdict(cfg)}
        torch.save(state, os.path.join(d, TRAINER_STATE + ".tmp"))
        os.replace(os.path.join(d, TRAINER_STATE + ".tmp"), os.path.join(d, TRAINER_STATE))
        with open(os.path.join(root, "latest"), "w") as f:
            f.write(os.path.basename(d))
        old = sorted(x for x in os.listdir(root) if x.startswith("step_"))
        for x in old[: -cfg.keep_checkpoints]:
            shutil.rmtree(os.path.join(root, x), ignore_errors=True)
    _barrier()
    return d


def load_trainer_state(policy, opt, sched, sampler, d: str) -> int:
    """Resume from save_checkpoint's directory (at any world size: DCP re-shards)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    sd = _dcp_state(policy, opt)
    dcp_io("load", sd, d)
    set_state_dict(policy, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    state = torch.load(os.path.join(d, TRAINER_STATE), weights_only=False)
    sched.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return state["step"]


def dcp_io(op: str, state: dict, path: str) -> None:
    """torch.distributed.checkpoint save/load: every rank its own shards; one process without a process group."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # single process: DCP warns that it assumes a single process, which it is
        warnings.filterwarnings("ignore", message="torch.distributed is .*uninitialized")
        getattr(dcp, op)(state, checkpoint_id=path, no_dist=not dist.is_initialized())


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def leave_process_group() -> None:
    """Every rank leaves the process group together. A rank that destroys a gloo group while another still runs
    (rank 0 exports the final checkpoint after the last collective) can abort in gloo's teardown ("terminate called
    without an active exception", seen once in a full-suite run under load; 12 reruns did not repeat it). Ranks > 0
    wait on the c10d store, not in a collective, so no NCCL watchdog fires however long the export takes; then one
    barrier, then the destroy."""
    if not dist.is_initialized():
        return
    import datetime

    store = dist.distributed_c10d._get_default_store()
    if dist.get_rank() == 0:
        store.set("dsmath/grpo/finished", "1")
    else:
        store.wait(["dsmath/grpo/finished"], datetime.timedelta(days=1))
    dist.barrier()
    dist.destroy_process_group()


def truncate_metrics(path: str, last_step: int) -> None:
    """Drop lines past the resumed step (written by the killed run after its last checkpoint)."""
    if os.path.exists(path):
        keep = [line for line in open(path) if line.strip() and json.loads(line)["step"] <= last_step]
        with open(path, "w") as f:
            f.writelines(keep)


# ---------------------------------------------------------------------------------------------------------------
# Main loop


def build(cfg: GRPOConfig):
    """Policy (+ reference), tokenizer, optimizer, schedule, sampler; resumed from OUT when a checkpoint exists.
    Nothing is ever materialised in full: the models are built on the meta device, sharded (under torchrun), and
    each rank allocates and fills only its own shards, from the checkpoint's slices, a row-wise preset init, or a
    sharded (DCP) checkpoint of this run."""
    rank, world = rank_world()
    ckpt = latest_checkpoint(cfg.out) if cfg.resume else None
    mcfg = model_config(cfg)
    lm = lm_on_meta(mcfg, torch.float32)  # the master weights
    index = None
    if os.path.isdir(cfg.model) and ckpt is None:  # headers only: a wrong checkpoint fails before any allocation
        index = model_module("sharded_load").check_checkpoint(lm, cfg.model)
    tokenizer = load_tokenizer(cfg, ckpt or (cfg.model if os.path.isdir(cfg.model) else None))
    problems = fit_prompts(load_data(cfg), tokenizer, cfg)
    lm.gradient_checkpointing = checkpointing_on(cfg)
    policy = Policy(lm)
    if dist.is_initialized():
        shard(policy, cfg)
    materialize(policy)
    if ckpt is None:
        fill_from_source(lm, cfg, index)
    if ckpt is None and cfg.warmstart_steps:
        from .toy import warm_start

        warm_start(lm, tokenizer, problems, cfg.warmstart_steps, lr=cfg.warmstart_lr, seed=cfg.seed,
                   correct_frac=cfg.warmstart_correct_frac, params=policy.parameters(),
                   logprobs=lambda ids, tg: policy(ids, tg, cfg=_at_t1(cfg))[0])
    ref = build_reference(policy, mcfg, cfg, fresh=ckpt is None) if cfg.beta > 0 else None
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            weight_decay=cfg.weight_decay)
    init_optimizer_state(opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    sampler = ProblemSampler(problems, seed=cfg.seed)
    start = load_trainer_state(policy, opt, sched, sampler, ckpt) if ckpt else 0
    return policy, ref, tokenizer, opt, sched, sampler, start


@torch.no_grad()
def init_optimizer_state(opt) -> None:
    """Allocate AdamW's moments now rather than at the first step (zeros, step counters 0: the same first update),
    so the memory the engine sizes its KV cache against at the first rollout already holds them."""
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()  # lr 0 and zero gradients: the parameters do not move
    opt.zero_grad(set_to_none=True)
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    for st in opt.state.values():
        st["step"] = torch.zeros_like(st["step"]) if torch.is_tensor(st["step"]) else 0


def _at_t1(cfg: GRPOConfig) -> GRPOConfig:
    from dataclasses import replace

    return replace(cfg, temperature=1.0)


def build_reference(policy: Policy, mcfg, cfg: GRPOConfig, fresh: bool) -> Policy:
    """The frozen reference = the policy at step 0 of this run, in the compute dtype (bf16 on GPUs), sharded like
    the policy (CPU-offloaded with cfg.ref_offload). A fresh run copies the policy's shards and saves them to OUT/ref
    (DCP); a resumed run reads them back."""

    ref = Policy(lm_on_meta(mcfg, compute_dtype(cfg))).requires_grad_(False).eval()
    offload = cfg.ref_offload and torch.cuda.is_available() and dist.is_initialized()
    if dist.is_initialized():
        shard(ref, cfg, reference=True)
    materialize(ref, offload=offload)
    ref_dir = os.path.join(cfg.out, "ref")
    if fresh:
        copy_shards(ref.lm, policy.lm)
        if rank_world()[0] == 0 and os.path.exists(ref_dir):
            shutil.rmtree(ref_dir)
        _barrier()
        dcp_io("save", {"model": ref.state_dict()}, ref_dir)
    else:
        sd = {"model": ref.state_dict()}
        dcp_io("load", sd, ref_dir)
        ref.load_state_dict(sd["model"])
    return ref


class Rollout:
    """The engine on its own copy of the weights in the compute dtype (bf16 on GPUs), which exists only while it
    samples. Per step: wake the weights -> copy the policy into them FSDP group by FSDP group (all-gather one
    decoder layer, copy, free: never a full unshard of the float32 parameters) -> wake the KV cache (same number of
    blocks as at start; CUDA graphs captured again, also under torchrun) -> generate -> sleep(level=2): KV cache,
    graphs and weights are freed for the policy update. The first wake creates the engine, whose KV-cache budget is
    cfg.engine_memory_fraction of the memory free after the weights and a profiling forward (torch.cuda.mem_get_info:
    the trainer's shards, the reference and other processes count)."""

    def __init__(self, policy: Policy, opt, tokenizer, cfg: GRPOConfig):
        self.lm = lm_on_meta(policy.lm.config, compute_dtype(cfg)).eval()
        self.opt, self.tokenizer, self.cfg, self.llm = opt, tokenizer, cfg, None
        self.cuda_graphs = 0  # decode batch sizes captured at the last wake (0: eager, e.g. on a CPU)

    def wake(self, policy: Policy):
        """Weights (copied from the policy), then the KV cache; -> the engine, ready to generate."""
        off = self.cfg.rollout_offload
        if off:  # the AdamW moments leave before the rollout weights arrive; the master shards after the sync
            move_optimizer_state(self.opt, torch.device("cpu"))
        if self.llm is None:
            self.lm.to_empty(device=device())
            self.lm.tie_weights()
            sync_weights(policy, self.lm)
            if off:
                policy.to("cpu")
            self.llm = make_engine(self.lm, self.tokenizer, self.cfg)
        else:
            self.llm.wake_up(["weights"])
            sync_weights(policy, self.lm)
            if off:
                policy.to("cpu")
            self.llm.wake_up(["kv_cache"])
        self.cuda_graphs = len(self.llm.runner.graphs)
        return self.llm

    def sleep(self, policy: Policy) -> None:
        """KV cache, CUDA graphs and rollout weights freed; offloaded training state back on the device."""
        self.llm.sleep(level=2)
        if self.cfg.rollout_offload:
            policy.to(device())  # FSDP2 re-registers its shards (FSDPModule._apply)
            move_optimizer_state(self.opt, device())


def move_optimizer_state(opt, dev: torch.device) -> None:
    """Move the optimizer's state tensors (AdamW moments; not the step counters) to dev."""
    for st in opt.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and k != "step" and v.device != dev:
                st[k] = v.to(dev, non_blocking=True)
    if torch.cuda.is_available():  # both directions: the copies are complete before anything is freed or read
        torch.cuda.synchronize()


@torch.no_grad()
def sync_weights(policy: Policy, dst) -> None:
    """policy -> dst (an unsharded MoEForCausalLM in the rollout dtype), one FSDP group at a time: the group is
    all-gathered (in bf16 under mixed precision; DeepSeek routers in fp32), copied, and freed before the next."""
    params = dict(dst.named_parameters())
    for unit, names in fsdp_units(policy):
        if unit is not None:
            unit.unshard()
        for n in names:
            params[n].copy_(policy.lm.get_parameter(n))
        if unit is not None:
            unit.reshard()
    for n, b in policy.lm.named_buffers():
        dst.get_buffer(n).copy_(b)


def make_engine(lm, tokenizer, cfg: GRPOConfig):
    LLM = model_module("engine").LLM

    need = cfg.group_size * max(1, cfg.problems_per_step // rank_world()[1])
    return LLM(lm, tokenizer=tokenizer, block_size=cfg.engine_block_size, seed=cfg.seed,
               max_num_seqs=max(cfg.engine_max_num_seqs, cfg.group_size),
               max_num_batched_tokens=max(8192, need), gpu_memory_fraction=cfg.engine_memory_fraction,
               cpu_kv_cache_gib=cfg.engine_cpu_kv_gib)


@dataclass
class Group:
    """One problem's G completions on this rank, scored."""
    prompt: list[int]
    comps: list
    reward: torch.Tensor   # [G]
    correct: torch.Tensor  # [G]

    @property
    def informative(self) -> bool:
        """Not all correct and not all wrong (DAPO's dynamic-sampling filter: on accuracy, not the total reward,
        whose format / overlong terms can differ inside a group that carries no signal about correctness)."""
        return bool((self.correct != self.correct[0]).any())


def collect(step: int, policy, rollout, tokenizer, sampler, pool, cfg: GRPOConfig):
    """Sample and score problems_per_step problems (this rank: its share). With drop_equal_groups (DAPO dynamic
    sampling) keep sampling new problems — at most max_resample_rounds more rounds, every rank the same number —
    until each rank holds its share of informative groups. -> (the share of groups to train on: informative first,
    then uninformative ones to keep every rank's batch the same size (they leave the loss), all groups sampled,
    extra rounds, generation seconds, scoring seconds).
    The rollout (a Rollout; None in tests that replace sample()) is awake for all rounds and asleep after."""
    rank, world = rank_world()
    P, G = cfg.problems_per_step, cfg.group_size
    share = P // world
    groups, rounds, gen_s, score_s = [], 0, 0.0, 0.0
    t0 = time.time()
    llm = rollout.wake(policy) if rollout is not None else None
    gen_s += time.time() - t0
    try:
        while True:
            mine = sampler.next(P)[rank * share : (rank + 1) * share]  # the same global batch on every rank
            prompts = [prompt_of(p.problem, tokenizer, cfg) for p in mine]
            t0 = time.time()
            comps = sample(llm, prompts, cfg, step, rounds * P + rank * share)
            t1 = time.time()
            reward, correct = score(comps, [p.answer for p in mine for _ in range(G)], tokenizer, pool, cfg)
            score_s, gen_s = score_s + time.time() - t1, gen_s + t1 - t0
            groups += [Group(p, comps[i * G : (i + 1) * G], reward[i * G : (i + 1) * G],
                             correct[i * G : (i + 1) * G]) for i, p in enumerate(prompts)]
            if not cfg.drop_equal_groups:
                return groups, groups, rounds, gen_s, score_s
            missing = all_sum(float(max(share - sum(g.informative for g in groups), 0)))
            if missing == 0 or rounds >= cfg.max_resample_rounds:
                break
            rounds += 1
    finally:
        if rollout is not None:
            rollout.sleep(policy)
    kept = [g for g in groups if g.informative][:share]
    kept += [g for g in groups if not g.informative][: share - len(kept)]
    return kept, groups, rounds, gen_s, score_s


def replay_on(cfg: GRPOConfig, lm) -> bool:
    """routing_replay: None -> on for MoE policies; True on a dense policy is an error."""
    moe = int(getattr(lm, "num_moe_layers", 0) or 0) > 0
    if cfg.routing_replay and not moe:
        raise ValueError("routing_replay: the policy has no MoE layers")
    return moe if cfg.routing_replay is None else bool(cfg.routing_replay)


def skip_recompute(cfg: GRPOConfig, lm, replay: bool) -> bool:
    """The old log-probs need no trainer forward where the engine's are the same by construction: one policy
    update per sampled batch (mu = 1, one minibatch: old = the sampling weights), the same experts (replay, or no
    MoE), the same precision (float32: the rollout copy holds the master weights exactly; with bf16 compute the
    engine's and the trainer's kernels round differently)."""
    moe = int(getattr(lm, "num_moe_layers", 0) or 0) > 0
    return (cfg.skip_recompute and cfg.mu == 1 and cfg.minibatches == 1 and (replay or not moe)
            and compute_dtype(cfg) == torch.float32)


def tis_weights(old: torch.Tensor, engine: torch.Tensor, mask: torch.Tensor, cap: float,
                mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance weights for the sampler-trainer mismatch, old / engine / mask [N, T] -> (weights [N, T]
    float32, cut [N, T] bool: tokens whose weight the cap changed). mode "token": min(exp(old - engine), cap);
    "sequence_mask": 1 for sequences whose geometric-mean ratio exp(mean_t (old - engine)) lies in [1/cap, cap],
    0 (all their tokens cut) for the others."""
    log_r = torch.where(mask, old - engine, 0.0)  # [N, T]
    if mode == "token":
        r = log_r.exp()
        return r.clamp(max=cap), (r > cap) & mask
    mean = log_r.sum(1) / mask.sum(1).clamp(min=1)  # [N] log of the geometric-mean ratio
    keep = mean.abs() <= math.log(cap)
    return keep.float()[:, None].expand_as(old).contiguous(), ~keep[:, None] & mask


def build_batch(groups: list[Group], cfg: GRPOConfig, pad: int, dev) -> dict:
    """Pack the groups; advantages from the rewards; the loss mask without DAPO-dropped groups (drop_equal_groups)
    and truncated completions (mask_truncated_completions)."""
    from dsmath_kernels import group_advantages

    G = cfg.group_size
    comps = [c for g in groups for c in g.comps]
    b = pack([g.prompt for g in groups for _ in range(G)], comps, pad, dev)
    b["adv"] = group_advantages(torch.cat([g.reward for g in groups]).to(dev), G, normalize=cfg.normalize)  # [N]
    keep = torch.ones(len(comps), dtype=torch.bool)
    if cfg.drop_equal_groups:  # masked, not removed: every rank runs the same micro batches (backward_minibatch)
        keep &= torch.tensor([g.informative for g in groups]).repeat_interleave(G)
    if cfg.mask_truncated_completions:
        keep &= torch.tensor([c.finish_reason != "length" for c in comps])
    b["mask"] &= keep.to(dev)[:, None]
    return b


def old_logprobs(policy: Policy, b: dict, cfg: GRPOConfig, replay: bool, skip: bool) -> dict:
    """b["old"] (and b["tis"]): the trainer's log-probs of the sampled tokens, or the engine's when `skip`. Returns
    the global sums measured on the way (gap, agreement, truncated tokens) over the loss mask."""
    mask = b["mask"]
    if skip:
        b["old"] = b["engine_lp"]
        return {}
    b["old"], agree = logprobs_of(policy, b, cfg, replay, agreement="routing" in b)
    d = torch.where(mask, (b["old"] - b["engine_lp"]).abs(), 0.0)
    out = {"gap": float(d.sum()), "gap_max": float(d.max()) if d.numel() else 0.0}
    if agree is not None:
        out["agree"] = float((agree & mask).sum())
    if cfg.tis_cap > 0:
        b["tis"], cut = tis_weights(b["old"], b["engine_lp"], mask, cfg.tis_cap, cfg.tis_mode)
        out["cut"] = float(cut.sum())
    return out


def train_step(step, policy, ref, rollout, tokenizer, opt, sched, sampler, pool, cfg: GRPOConfig) -> dict:
    dev = policy.lm.device
    replay = replay_on(cfg, policy.lm)
    skip = skip_recompute(cfg, policy.lm, replay)

    policy.eval()
    groups, sampled, rounds, gen_s, score_s = collect(step, policy, rollout, tokenizer, sampler, pool, cfg)
    t2, c2 = time.time(), time.process_time()  # CPU seconds too: robust timing on a loaded machine
    b = build_batch(groups, cfg, tokenizer.pad_token_id or 0, dev)
    if replay and "routing" not in b:
        raise RuntimeError("routing_replay: the engine returned no routing (built with record_routing=False?)")
    measured = old_logprobs(policy, b, cfg, replay, skip)
    if ref is not None:
        b["ref"], _ = logprobs_of(ref, b, cfg, replay)
    t_lp, c_lp = time.time() - t2, time.process_time() - c2
    policy.train()
    upd = policy_update(policy, opt, b, cfg, replay=replay)
    opt.zero_grad(set_to_none=True)  # no gradients held through the next rollout
    sched.step()
    t3, c3 = time.time(), time.process_time()

    first = upd.pop("first_pass")
    reward = torch.cat([g.reward for g in sampled])
    correct = torch.cat([g.correct for g in sampled])
    flat = [bool((g.reward == g.reward[0]).all()) for g in sampled]
    local = {"reward_sum": float(reward.sum()), "reward_sq": float((reward**2).sum()),
             "correct": float(correct.sum()), "n": float(len(reward)), "flat": float(sum(flat)),
             "acc_flat": float(sum(not g.informative for g in sampled)), "groups": float(len(sampled)),
             "len": float(sum(len(c.token_ids) for g in sampled for c in g.comps)),
             "kept_informative": float(sum(g.informative for g in groups)), "tokens": float(b["mask"].sum()),
             **{k: v for k, v in measured.items() if k != "gap_max"}}
    g = {k: all_sum(v) for k, v in local.items()}
    mean, tok = g["reward_sum"] / g["n"], max(g["tokens"], 1.0)
    out = {"step": step + 1, "reward_mean": mean, "reward_std": math.sqrt(max(g["reward_sq"] / g["n"] - mean**2, 0)),
           "accuracy": g["correct"] / g["n"], "zero_var_frac": g["flat"] / g["groups"],
           "acc_flat_frac": g["acc_flat"] / g["groups"], "resample_rounds": rounds,
           "informative_frac": g["kept_informative"] / cfg.problems_per_step, "resp_len": g["len"] / g["n"],
           "logprob_gap": first["log_ratio_abs"] if skip else g["gap"] / tok,
           "logprob_gap_max": first["log_ratio_abs_max"] if skip else all_max(measured["gap_max"]),
           "recompute_skipped": skip, "routing_replay": replay}
    if "routing" in b:  # MoE policies
        out["router_agreement"] = first["router_agreement"] if skip else g["agree"] / tok
    out["tis_truncated_frac"] = g["cut"] / tok if "cut" in g else 0.0
    out.update(upd)
    out.update({"lr": sched.get_last_lr()[0], "tokens_per_s": g["len"] / max(gen_s, 1e-9), "gen_s": gen_s,
                "score_s": score_s, "logprob_s": t_lp, "train_s": t3 - t2, "step_s": gen_s + score_s + t3 - t2,
                "logprob_cpu_s": c_lp, "train_cpu_s": c3 - c2})
    return out


def run(cfg: GRPOConfig) -> list[dict]:
    """Train (or resume) per cfg; -> this invocation's metric records. A run that reaches cfg.steps exports its
    final checkpoint to OUT/hf/step_N (train.export: safetensors in the compute dtype, loadable by transformers)."""
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    rank, world = rank_world()
    if cfg.problems_per_step % world:  # before any weight is allocated
        raise ValueError(f"problems_per_step={cfg.problems_per_step} must divide by the world size {world}")
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.out, exist_ok=True)
    release_freed_host_memory()
    mem = PeakMemory()
    try:
        history, final = _train(cfg, mem)
        gc.collect()  # FSDP2 hooks form reference cycles: free the training state before the export
        summary = os.path.join(cfg.out, "memory.json")
        mem.write_summary(summary)  # the last collective: the export below may outlast a NCCL timeout
        if final is not None and rank == 0:  # one bucket of parameters at a time; the other ranks may leave
            from .export import export_checkpoint

            export_checkpoint(final, os.path.join(cfg.out, "hf", os.path.basename(final)),
                              dtype=cfg.export_dtype or str(compute_dtype(cfg)).replace("torch.", ""))
            mem.amend_summary(summary)
    finally:
        torch.set_num_threads(threads)
    return history


def _train(cfg: GRPOConfig, mem: PeakMemory) -> tuple[list[dict], str | None]:
    """The training loop; -> (metric records, the final checkpoint when the run reached cfg.steps)."""
    rank, world = rank_world()
    policy, ref, tokenizer, opt, sched, sampler, start = build(cfg)
    load_peak = mem.gather(mem.peak())
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    if rank == 0:
        truncate_metrics(metrics_path, start)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=1)
    rollout = Rollout(policy, opt, tokenizer, cfg)
    pool = VerifyPool(workers=cfg.reward_workers, timeout=cfg.reward_timeout)
    history, final = [], None
    bar = _progress(start, cfg.steps, rank)
    try:
        for step in range(start, cfg.steps):
            mem.reset()
            m = train_step(step, policy, ref, rollout, tokenizer, opt, sched, sampler, pool, cfg)
            done = step + 1
            if done == cfg.steps or (cfg.save_every and done % cfg.save_every == 0):
                d = save_checkpoint(policy, opt, sched, sampler, tokenizer, done, cfg)
                final = d if done == cfg.steps else None
            peaks = mem.gather(mem.peak())  # the step and its checkpoint
            m |= {"peak_mem_gib": max(peaks), "peak_mem_gib_ranks": peaks, "rollout_cuda_graphs": rollout.cuda_graphs}
            if not history:
                m["load_peak_mem_gib"] = max(load_peak)
            history.append(m)
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(m) + "\n")
                bar.set_postfix(reward=f"{m['reward_mean']:.3f}", len=f"{m['resp_len']:.0f}")
                bar.update(1)
            if cfg.stop_after is not None and done >= cfg.stop_after:
                break
    finally:
        pool.close()
        bar.close()
    return history, final


def release_freed_host_memory() -> None:
    """On a CPU (Linux/glibc), serve allocations of 1 MiB and more with mmap so that freeing returns them to the OS.
    By default glibc raises that threshold up to 32 MiB after the first large free and keeps later frees in its
    heap: the rollout weights freed by sleep() and FSDP2's per-layer all-gather buffers would then stay resident
    (measured: a worker's RSS grew by ~2x the model's fp32 size more than its live tensors). No-op elsewhere."""
    if torch.cuda.is_available() or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixed: no dynamic adjustment)
    except (OSError, AttributeError):  # another libc (musl): its allocator returns large blocks anyway
        pass


class PeakMemory:
    """Peak memory of this process: torch.cuda.max_memory_allocated on CUDA; on a CPU, the resident set's
    high-water mark (VmHWM; reset per step through /proc/self/clear_refs). `lifetime` keeps the maximum seen."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self.lifetime = 0.0
        self.load = None
        self.start = self._read(current=True)

    def reset(self) -> None:
        self.lifetime = max(self.lifetime, self._read())
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:  # not Linux: the peak stays the process's lifetime peak
                pass

    def peak(self) -> float:
        """GiB since the last reset (or the start)."""
        p = self._read()
        self.lifetime = max(self.lifetime, p)
        if self.load is None:
            self.load = p
        return p

    def _read(self, current: bool = False) -> float:
        """GiB: the peak since the last reset, or (current=True) what is held now."""
        if self.cuda:
            return (torch.cuda.memory_allocated() if current else torch.cuda.max_memory_allocated()) / 2**30
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:" if current else "VmHWM:"):
                        return int(line.split()[1]) / 2**20
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    @staticmethod
    def gather(x: float) -> list[float]:
        """[x of rank 0, x of rank 1, ...] on every rank."""
        rank, world = rank_world()
        if world == 1 and not dist.is_initialized():
            return [round(x, 4)]
        t = torch.zeros(world, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
        t[rank] = x
        dist.all_reduce(t)
        return [round(v, 4) for v in t.tolist()]

    def amend_summary(self, path: str) -> None:
        """Rank 0 after the export: its run peak in memory.json now includes the export."""
        with open(path) as f:
            d = json.load(f)
        d["run_peak_gib"][0] = round(max(d["run_peak_gib"][0], self.lifetime, self._read()), 4)
        with open(path, "w") as f:
            json.dump(d, f, indent=1)

    def write_summary(self, path: str) -> None:
        """memory.json: per rank, what was held when run() started, the peak while loading and the run's peak
        (export included), in GiB."""
        start, load = self.gather(self.start), self.gather(self.load or 0.0)
        life = self.gather(max(self.lifetime, self._read()))
        if rank_world()[0] == 0:
            with open(path, "w") as f:
                json.dump({"kind": "cuda_max_allocated" if self.cuda else "rss_high_water", "world": len(life),
                           "start_gib": start, "load_peak_gib": load, "run_peak_gib": life}, f, indent=1)


def print_memory_plan(cfg: GRPOConfig, world: int | None, gpu_gib: float | None, prompt_tokens: int | None,
                      json_path: str | None = None) -> dict:
    """--plan-memory: the per-rank memory plan of this config (train/memory_plan.py), without running. World size:
    --world-size, else torchrun's WORLD_SIZE, else 8; GPU memory: --gpu-gib, else this machine's GPU, else an
    80 GB H100 (79.6 GiB); prompt tokens: --plan-prompt-tokens, else max_prompt_length (the longest admitted)."""
    prompt_tokens = prompt_tokens or cfg.max_prompt_length
    from .memory_plan import format_plan, plan

    world = world or int(os.environ.get("WORLD_SIZE", 8))
    if gpu_gib is None:
        gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 79.6
    p = plan(cfg, model_config(cfg), world, gpu_gib, prompt_tokens)
    print(format_plan(p, cfg))
    print(json.dumps(p))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(p, f, indent=1)
    return p


def _progress(start: int, total: int, rank: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=rank != 0, desc="grpo", file=sys.stderr)


def main(argv=None) -> None:
    import argparse

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--plan-memory", action="store_true")
    pre.add_argument("--world-size", type=int, default=None)
    pre.add_argument("--gpu-gib", type=float, default=None)
    pre.add_argument("--plan-prompt-tokens", type=int, default=None)
    pre.add_argument("--plan-json", default=None)
    a, rest = pre.parse_known_args(argv)
    cfg = parse_config(rest)
    if a.plan_memory:
        print_memory_plan(cfg, a.world_size, a.gpu_gib, a.plan_prompt_tokens, a.plan_json)
        return
    run(cfg)
    leave_process_group()


if __name__ == "__main__":
    main()
