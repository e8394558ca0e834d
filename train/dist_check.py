"""Data-parallel check: the GRPO loss and gradients of one optimizer step on a fixed batch, computed by one process
or by N FSDP2 ranks (each holding 1/N of the rows), must agree.

    python -m train.dist_check --out one.pt                                 # single process
    torchrun --nproc-per-node 2 -m train.dist_check --out two.pt            # FSDP2 (gloo on CPU, nccl on GPU)

Writes {loss_type: {"metrics", "grads": {name: full gradient}}} from rank 0; tests/test_train_fsdp.py compares.
The batch has uneven completion lengths, masked-out (dropped) groups and old/ref log-probs, for every loss type.

    torchrun --nproc-per-node 4 -m train.dist_check --weights --model tiny --out w4.pt   # sharded init / load

`--weights`: build the policy as the trainer does (meta device, FSDP2 shards, each rank filling its own slices from
the checkpoint directory or the preset's row-wise init) and write the gathered weights: world sizes must agree.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from ._pkg import model_module
from .config import GRPOConfig
from .grpo import (
    METRIC_KEYS,
    Policy,
    backward_minibatch,
    fill_from_source,
    lm_on_meta,
    materialize,
    model_config,
    rank_world,
    shard,
)


def fixed_batch(N: int = 8, T: int = 12, V: int = 128, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (N, T + 1), generator=g)
    lens = torch.randint(2, T - 3, (N,), generator=g)  # completion lengths
    start = torch.randint(1, 3, (N,), generator=g)  # prompt lengths - 1
    pos = torch.arange(T)[None]
    mask = (pos >= start[:, None]) & (pos < (start + lens)[:, None])  # [N, T]
    mask[2:4] = False  # a dropped group
    return {"ids": ids[:, :-1], "targets": ids[:, 1:], "mask": mask,
            "adv": torch.randn(N, generator=g), "old": -torch.rand(N, T, generator=g) * 5,
            "ref": -torch.rand(N, T, generator=g) * 5}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--loss-types", default="grpo,dapo,dr_grpo")
    ap.add_argument("--micro-batch", type=int, default=3)
    ap.add_argument("--weights", action="store_true", help="check the sharded build instead (see the docstring)")
    ap.add_argument("--model", default="tiny", help="--weights: presets or checkpoint directories, comma-separated")
    a = ap.parse_args(argv)
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.set_num_threads(1)
    if a.weights:
        return sharded_weights(a.model, a.out)
    rank, world = rank_world()
    MoEForCausalLM = model_module().MoEForCausalLM

    torch.manual_seed(0)
    cfg = GRPOConfig(micro_batch=a.micro_batch, beta=0.04, max_tokens=16)
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
    if torch.cuda.is_available():
        torch.cuda.set_device(dev)
    policy = Policy(MoEForCausalLM.from_preset("tiny", device=dev))
    b = {k: v.to(dev) for k, v in fixed_batch().items()}
    if world > 1:
        shard(policy, cfg)
        share = b["ids"].shape[0] // world
        b = {k: v[rank * share : (rank + 1) * share] for k, v in b.items()}
    results = {}
    for lt in a.loss_types.split(","):
        cfg.loss_type = lt
        policy.zero_grad(set_to_none=True)
        stats = {}
        backward_minibatch(policy, b, slice(0, b["ids"].shape[0]), cfg, stats)
        grads = {}
        for name, p in policy.named_parameters():
            g = p.grad
            grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().cpu().clone()
        sums = torch.tensor([stats["tokens"], stats["objective"]] + [stats[k] for k in METRIC_KEYS],
                            dtype=torch.float64)
        if world > 1:  # per-token means of the logged metrics over all ranks
            sums = sums.to(dev)
            dist.all_reduce(sums)
            sums = sums.cpu()
        metrics = {"loss": float(sums[1]), **{k: float(v / sums[0]) for k, v in zip(METRIC_KEYS, sums[2:])}}
        results[lt] = {"metrics": metrics, "grads": grads}
    if rank == 0:
        torch.save({"world": world, **results}, a.out)
    if world > 1:
        dist.barrier()  # no rank tears its process group down while another still works
        dist.destroy_process_group()


def sharded_weights(models: str, out: str) -> None:
    """For each of the comma-separated models (presets or checkpoint directories): build the float32 policy the
    trainer's way, copy it into a bf16 rollout model unit by unit (sync_weights), and save (rank 0)
    {model: {"weights": {name: full float32 tensor}, "rollout": {name: rollout tensor}}}."""
    from .grpo import Rollout, sync_weights

    results = {}
    for model in models.split(","):
        cfg = GRPOConfig(model=model, seed=3, dtype="bfloat16")
        lm = lm_on_meta(model_config(cfg), torch.float32)
        index = None
        if os.path.isdir(model):
            from ._pkg import model_module

            index = model_module("sharded_load").check_checkpoint(lm, model)
        policy = Policy(lm)
        if dist.is_initialized():
            shard(policy, cfg)
        materialize(policy)
        fill_from_source(lm, cfg, index)
        rollout = Rollout(policy, None, None, cfg).lm
        rollout.to_empty(device=lm.device)
        sync_weights(policy, rollout)
        full = lambda m: {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()
                          for n, t in list(m.named_parameters()) + list(m.named_buffers())}
        results[model] = {"weights": full(lm), "rollout": full(rollout)}
    rank, world = rank_world()
    if rank == 0:
        torch.save({"world": world, **results}, out)
    if dist.is_initialized():
        dist.barrier()  # no rank tears its process group down while another still works
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
