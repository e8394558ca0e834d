"""GRPO for math with verifiable rewards — DeepSeekMath's recipe as one readable loop.

Algorithm (Shao et al. 2024, "DeepSeekMath", section 4), one step:
  1. take P problems; the engine samples G completions of each ON THE LIVE POLICY WEIGHTS (same process, the
     model object itself, no weight copy) and returns each token's sampled log-prob;
  2. reward r = math_reward(completion, gold) (+ optional format / overlong terms);
  3. advantages A_i = (r_i - mean(r_group)) / (std(r_group) + eps), the same for every token of completion i;
  4. old log-probs (trainer forward, no grad) and, if beta > 0, reference log-probs from a frozen copy of the
     starting policy;
  5. mu passes over the batch in `minibatches` optimizer steps of
        loss = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * KL_k3(pi || ref)
     averaged per `loss_type` (dsmath_kernels.grpo_loss: fused LM head + log-softmax, never the [B*T, V] logits),
     AdamW, gradient clipping at `grad_clip`, linear warm-up then constant or cosine LR.

Defaults are DeepSeekMath's (G = 64, beta = 0.04, lr 1e-6, eps 0.2, one policy update per sampling round,
per-sequence mean). Options: DAPO (`--config dapo`: clip-higher 0.2/0.28, token-level mean, dropping groups whose
rewards are all equal, soft overlong penalty, no KL) and Dr. GRPO (`--config dr_grpo`: no std division, sum over
tokens divided by a constant B * max_tokens, no KL).

Departures from the paper:
  - outcome rewards only (no process supervision; no reward model — the reward is the verifier);
  - DAPO's dynamic sampling drops the all-equal groups instead of sampling more until the batch is full;
  - the reference model is the policy at step 0 of THIS run (after an optional warm start), kept in full on each
    rank (sharded like the policy under FSDP2); no periodic reference reset (DeepSeekMath's iterative RL);
  - bf16: single process keeps fp32 weights (the master copy) and trains under autocast, generating in fp32;
    under FSDP2 the sharded fp32 parameters are the master copy and compute/generation use bf16 all-gathers.

Launch:
    python -m train.grpo --config toy --out runs/toy                      # CPU proof, < 10 min on 2 cores
    python -m train.grpo --model CKPT --data ../shared/data/gsm8k/test.jsonl --dataset gsm8k --out runs/gsm
    torchrun --nproc-per-node 8 -m train.grpo --config dapo --model CKPT --data train.jsonl --out runs/dapo
    python -m train.plot runs/toy                                          # reward, KL, length curves

Under torchrun the policy is sharded with FSDP2 (`fully_shard` per decoder layer and the root); each rank samples
its share of the P problems (P divisible by the world size), un-shards the weights for generation, and the loss is
normalised by global counts so gradients equal a single process's on the same data.
Outputs in OUT: metrics.jsonl (one JSON object per step), ckpt/step_N/ (safetensors + config.json + tokenizer,
loadable by transformers; trainer.pt with optimizer, LR schedule, RNG and data position), ref/ (reference weights).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

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

    def forward(self, ids, targets, mask=None, adv=None, old=None, ref=None, cfg: GRPOConfig | None = None):
        """ids/targets [B, T]. Without `adv`: token log-probs [B, T]. With it: (grpo loss, metrics)."""
        from dsmath_kernels import grpo_loss, token_logprobs

        hidden = self.lm(ids, return_hidden=True).hidden  # [B, T, H]
        w = self.lm.lm_head.weight  # [V, H]
        if adv is None:
            return token_logprobs(hidden, w.to(hidden.dtype), targets, temperature=cfg.temperature)
        return grpo_loss(hidden, w.to(hidden.dtype), targets, mask, adv, old_logprobs=old, ref_logprobs=ref,
                         beta=cfg.beta, eps_low=cfg.eps_low, eps_high=cfg.eps_high, temperature=cfg.temperature,
                         loss_type=cfg.loss_type)


def fsdp_modules(policy) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in policy.modules() if isinstance(m, FSDPModule)]


def shard(policy: Policy, cfg: GRPOConfig) -> None:
    """FSDP2: one group per decoder layer plus the root (embeddings, final norm, LM head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(dev, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if cfg.dtype == "bfloat16" else MixedPrecisionPolicy()
    for layer in policy.lm.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(policy, mesh=mesh, mp_policy=mp)


class Unsharded:
    """`with Unsharded(policy):` full weights in place (for the engine and for saving), re-sharded after."""

    def __init__(self, policy):
        self.mods = fsdp_modules(policy) if dist.is_initialized() else []

    def __enter__(self):
        for m in self.mods:
            m.unshard()

    def __exit__(self, *exc):
        for m in self.mods:
            m.reshard()


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


def load_lm(cfg: GRPOConfig, path: str | None = None):
    """The policy LM in fp32 (the master weights): from `path` (a checkpoint) or cfg.model (directory or preset)."""
    MoEForCausalLM = model_module().MoEForCausalLM
    presets = model_module("presets")

    src = path or cfg.model
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if os.path.isdir(src):
        return MoEForCausalLM.from_pretrained(src, dtype=torch.float32, device=dev)
    if src not in presets.PRESETS:
        raise ValueError(f"model: {src!r} is neither a directory nor a preset ({', '.join(presets.PRESETS)})")
    torch.manual_seed(cfg.seed)
    overrides = json.loads(cfg.model_overrides) if cfg.model_overrides else {}
    return MoEForCausalLM.from_config(presets.preset(src, **overrides), dtype=torch.float32, device=dev,
                                      init_std=cfg.init_std)


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
    whatever the batch composition or the number of ranks."""
    SamplingParams = model_module("engine").SamplingParams

    params = [SamplingParams(n=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p,
                             max_tokens=cfg.max_tokens, logprobs=True,
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
    mask marks the completion tokens; engine_lp holds their sampled log-probs."""
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
    return {"ids": ids[:, :-1].to(device), "targets": ids[:, 1:].to(device), "mask": mask.to(device),
            "engine_lp": engine_lp.to(device)}


def micro_slices(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def trim(b: dict, rows: slice) -> dict:
    """Rows of the batch, cut to their longest completion (less padding per micro batch)."""
    sub = {k: v[rows] for k, v in b.items()}
    T = int(sub["mask"].any(0).nonzero().max()) + 1 if sub["mask"].any() else 1
    return {k: (v[:, :T] if v.dim() == 2 else v) for k, v in sub.items()}


def autocast(cfg: GRPOConfig):
    if cfg.dtype == "bfloat16" and not dist.is_initialized():
        return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def logprobs_of(policy: Policy, b: dict, cfg: GRPOConfig) -> torch.Tensor:
    out = torch.zeros_like(b["engine_lp"])
    for s in micro_slices(b["ids"].shape[0], cfg.micro_batch):
        m = trim(b, s)
        with autocast(cfg):
            out[s, : m["ids"].shape[1]] = policy(m["ids"], m["targets"], cfg=cfg).float()
    return out


# ---------------------------------------------------------------------------------------------------------------
# The policy update


def all_sum(x: float) -> float:
    if not dist.is_initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return float(t.item())


METRIC_KEYS = ("kl", "clip", "clip_low", "clip_high", "entropy")


def backward_minibatch(policy: Policy, b: dict, rows: slice, cfg: GRPOConfig, stats: dict) -> None:
    """Accumulate the gradient of one optimizer step's loss over `rows` of b (in micro batches). Every rank runs
    the same number of micro batches (FSDP all-gathers in each); dropped groups are masked out, not removed."""
    live = b["mask"][rows].any(1)
    n_seq, n_tok = all_sum(float(live.sum())), all_sum(float(b["mask"][rows].sum()))
    for s in micro_slices(rows.stop - rows.start, cfg.micro_batch):
        m = trim(b, slice(rows.start + s.start, rows.start + s.stop))
        with autocast(cfg):
            loss, met = policy(m["ids"], m["targets"], m["mask"], m["adv"], m.get("old"), m.get("ref"), cfg=cfg)
        scale = loss_scale(m, cfg, max(n_seq, 1.0), max(n_tok, 1.0))
        (loss * scale).backward()
        k = float(m["mask"].sum())
        stats["tokens"] = stats.get("tokens", 0.0) + k
        stats["objective"] = stats.get("objective", 0.0) + float(loss.detach()) * scale / rank_world()[1]
        for key in METRIC_KEYS:
            stats[key] = stats.get(key, 0.0) + float(met[key]) * k


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


def policy_update(policy: Policy, opt, b: dict, cfg: GRPOConfig) -> dict:
    """mu passes x `minibatches` optimizer steps over the batch b (ids, targets, mask, adv, old, ref)."""
    N = b["ids"].shape[0]
    params = [p for p in policy.parameters() if p.requires_grad]
    stats, norms = {}, []
    for _ in range(cfg.mu):
        for rows in micro_slices(N, -(-N // cfg.minibatches)):
            opt.zero_grad(set_to_none=True)
            backward_minibatch(policy, b, rows, cfg, stats)
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            norms.append(float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn))
            opt.step()
    tokens = all_sum(stats.pop("tokens"))
    loss = all_sum(stats.pop("objective")) / len(norms)  # the optimised loss, averaged over optimizer steps
    return {"loss": loss, **{k: all_sum(v) / max(tokens, 1.0) for k, v in stats.items()},
            "grad_norm": sum(norms) / len(norms)}


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def latest_checkpoint(out: str) -> str | None:
    f = os.path.join(out, "ckpt", "latest")
    if not os.path.exists(f):
        return None
    d = os.path.join(out, "ckpt", open(f).read().strip())
    return d if os.path.exists(os.path.join(d, "trainer.pt")) else None


def save_checkpoint(policy, opt, sched, sampler, tokenizer, step: int, cfg: GRPOConfig) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    rank, _ = rank_world()
    d = os.path.join(cfg.out, "ckpt", f"step_{step:06d}")
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered to rank 0's CPU
    osd = get_optimizer_state_dict(policy, opt, options=opts)
    lm = full_lm(policy, opts)
    if rank == 0:
        lm.save_pretrained(d)
        tokenizer.save_pretrained(d)
        state = {"step": step, "optimizer": osd, "scheduler": sched.state_dict(), "sampler": sampler.state_dict(),
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}, "config": asdict(cfg)}
        torch.save(state, os.path.join(d, "trainer.pt.tmp"))
        os.replace(os.path.join(d, "trainer.pt.tmp"), os.path.join(d, "trainer.pt"))  # complete => resumable
        with open(os.path.join(cfg.out, "ckpt", "latest"), "w") as f:
            f.write(os.path.basename(d))
        old = sorted(x for x in os.listdir(os.path.join(cfg.out, "ckpt")) if x.startswith("step_"))
        for x in old[: -cfg.keep_checkpoints]:
            shutil.rmtree(os.path.join(cfg.out, "ckpt", x), ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


def full_lm(policy: Policy, opts):
    """The LM with full weights for saving: the live module in one process; under FSDP2 a CPU copy on rank 0
    built from the gathered state dict (every rank takes part in the gather; others get None)."""
    if not dist.is_initialized():
        return policy.lm
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(policy, options=opts)
    if dist.get_rank() != 0:
        return None
    MoEForCausalLM = model_module().MoEForCausalLM

    with torch.device("meta"):
        lm = MoEForCausalLM(policy.lm.config)
    lm.load_state_dict({k.removeprefix("lm."): v for k, v in sd.items()}, assign=True)
    return lm


def load_trainer_state(policy, opt, sched, sampler, d: str) -> int:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = torch.load(os.path.join(d, "trainer.pt"), weights_only=False)
    set_optimizer_state_dict(policy, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    sched.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return state["step"]


def truncate_metrics(path: str, last_step: int) -> None:
    """Drop lines past the resumed step (written by the killed run after its last checkpoint)."""
    if os.path.exists(path):
        keep = [line for line in open(path) if line.strip() and json.loads(line)["step"] <= last_step]
        with open(path, "w") as f:
            f.writelines(keep)


# ---------------------------------------------------------------------------------------------------------------
# Main loop


def build(cfg: GRPOConfig):
    """Policy (+ reference), tokenizer, optimizer, schedule, sampler; resumed from OUT when a checkpoint exists."""
    rank, world = rank_world()
    ckpt = latest_checkpoint(cfg.out) if cfg.resume else None
    lm = load_lm(cfg, ckpt)
    tokenizer = load_tokenizer(cfg, ckpt or (cfg.model if os.path.isdir(cfg.model) else None))
    problems = fit_prompts(load_data(cfg), tokenizer, cfg)
    if ckpt is None and cfg.warmstart_steps:
        from .toy import warm_start

        warm_start(lm, tokenizer, problems, cfg.warmstart_steps, lr=cfg.warmstart_lr, seed=cfg.seed,
                   correct_frac=cfg.warmstart_correct_frac)
    ref_dir = os.path.join(cfg.out, "ref")
    if cfg.beta > 0 and ckpt is None and rank == 0:
        lm.save_pretrained(ref_dir)  # the reference = the policy before RL (after any warm start)
    if dist.is_initialized():
        dist.barrier()
    ref = Policy(load_lm(cfg, ref_dir)).requires_grad_(False).eval() if cfg.beta > 0 else None
    lm.gradient_checkpointing = cfg.activation_checkpointing
    policy = Policy(lm)
    if world > 1:
        shard(policy, cfg)
        if ref is not None:
            shard(ref, cfg)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    sampler = ProblemSampler(problems, seed=cfg.seed)
    start = load_trainer_state(policy, opt, sched, sampler, ckpt) if ckpt else 0
    return policy, ref, tokenizer, opt, sched, sampler, start


def make_engine(lm, tokenizer, cfg: GRPOConfig):
    LLM = model_module("engine").LLM

    need = cfg.group_size * max(1, cfg.problems_per_step // rank_world()[1])
    return LLM(lm, tokenizer=tokenizer, block_size=cfg.engine_block_size, seed=cfg.seed,
               max_num_seqs=max(cfg.engine_max_num_seqs, cfg.group_size),
               max_num_batched_tokens=max(8192, need), gpu_memory_fraction=cfg.engine_memory_fraction,
               enforce_eager=dist.is_initialized(), cpu_kv_cache_gib=0.25)


def train_step(step, policy, ref, llm, tokenizer, opt, sched, sampler, pool, cfg: GRPOConfig) -> dict:
    rank, world = rank_world()
    P = cfg.problems_per_step
    batch = sampler.next(P)  # the same global batch on every rank
    share = P // world
    mine = batch[rank * share : (rank + 1) * share]
    prompts = [prompt_of(p.problem, tokenizer, cfg) for p in mine]
    dev = policy.lm.device

    t0 = time.time()
    policy.eval()
    with Unsharded(policy):
        comps = sample(llm, prompts, cfg, step, rank * share)
    t1 = time.time()
    golds = [p.answer for p in mine for _ in range(cfg.group_size)]
    reward, correct = score(comps, golds, tokenizer, pool, cfg)
    t2 = time.time()

    from dsmath_kernels import group_advantages

    rows = [p for p in prompts for _ in range(cfg.group_size)]
    b = pack(rows, comps, tokenizer.pad_token_id or 0, dev)
    b["adv"] = group_advantages(reward.to(dev), cfg.group_size, normalize=cfg.normalize)  # [N]
    flat = (reward.view(-1, cfg.group_size) == reward.view(-1, cfg.group_size)[:, :1]).all(1)  # [P/world]
    b["old"] = logprobs_of(policy, b, cfg)  # also gives the engine-vs-trainer gap
    gap = float(((b["old"] - b["engine_lp"]).abs() * b["mask"]).sum() / b["mask"].sum().clamp(min=1))
    if ref is not None:
        b["ref"] = logprobs_of(ref, b, cfg)
    if cfg.drop_equal_groups:  # DAPO: groups with all-equal rewards leave the loss (masked, see backward_minibatch)
        b["mask"] &= (~flat).repeat_interleave(cfg.group_size).to(dev)[:, None]
    policy.train()
    upd = policy_update(policy, opt, b, cfg)
    sched.step()
    t3 = time.time()

    gen_tokens = sum(len(c.token_ids) for c in comps)
    local = {"reward_sum": float(reward.sum()), "reward_sq": float((reward**2).sum()),
             "correct": float(correct.sum()), "n": float(len(comps)), "flat": float(flat.sum()),
             "groups": float(flat.numel()), "len": float(gen_tokens), "gap": gap}
    g = {k: all_sum(v) for k, v in local.items()}
    mean = g["reward_sum"] / g["n"]
    return {"step": step + 1, "reward_mean": mean, "reward_std": math.sqrt(max(g["reward_sq"] / g["n"] - mean**2, 0)),
            "accuracy": g["correct"] / g["n"], "zero_var_frac": g["flat"] / g["groups"],
            "resp_len": g["len"] / g["n"], "logprob_gap": g["gap"] / world, **upd,
            "lr": sched.get_last_lr()[0], "tokens_per_s": g["len"] / max(t1 - t0, 1e-9),
            "gen_s": t1 - t0, "score_s": t2 - t1, "train_s": t3 - t2}


def run(cfg: GRPOConfig) -> list[dict]:
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    rank, world = rank_world()
    if cfg.problems_per_step % world:
        raise ValueError(f"problems_per_step={cfg.problems_per_step} must divide by the world size {world}")
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.out, exist_ok=True)
    policy, ref, tokenizer, opt, sched, sampler, start = build(cfg)
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    if rank == 0:
        truncate_metrics(metrics_path, start)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=1)
    with Unsharded(policy):  # the engine may run a profiling forward
        llm = make_engine(policy.lm, tokenizer, cfg)
    pool = VerifyPool(workers=cfg.reward_workers, timeout=cfg.reward_timeout)
    history = []
    bar = _progress(start, cfg.steps, rank)
    try:
        for step in range(start, cfg.steps):
            m = train_step(step, policy, ref, llm, tokenizer, opt, sched, sampler, pool, cfg)
            history.append(m)
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(m) + "\n")
                bar.set_postfix(reward=f"{m['reward_mean']:.3f}", len=f"{m['resp_len']:.0f}")
                bar.update(1)
            done = step + 1
            if done == cfg.steps or (cfg.save_every and done % cfg.save_every == 0):
                save_checkpoint(policy, opt, sched, sampler, tokenizer, done, cfg)
            if cfg.stop_after is not None and done >= cfg.stop_after:
                break
    finally:
        pool.close()
        bar.close()
        torch.set_num_threads(threads)
    return history


def _progress(start: int, total: int, rank: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=rank != 0, desc="grpo", file=sys.stderr)


def main(argv=None) -> None:
    cfg = parse_config(argv)
    run(cfg)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
