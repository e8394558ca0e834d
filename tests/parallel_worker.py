"""Run under torchrun by tests/test_parallel.py: every rank builds the same LLM with tensor_parallel_size = world
size and generates greedily for each scenario; rank 0 writes the tokens (and each rank's bytes of weights) to
--out as JSON. Scenarios: name=checkpoint:expert_parallel:dispatch:prompt-set[:act], see test_parallel.py."""

import argparse
import json
import os

import torch
import torch.distributed as dist

from model import LLM, SamplingParams

PROMPTS = {"many": [[3, 17, 29, 5, 77, 8, 9], [9, 8, 7], [100, 2, 64, 64, 1, 5, 6, 7, 8, 10, 11]],
           "one": [[42, 7, 19]]}  # one sequence: at decode, every rank but rank 0 has no token


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-tokens", type=int, default=6)
    ap.add_argument("scenarios", nargs="+", help="name=ckpt_dir:ep(0/1):dispatch:prompts:act:dp_attention(0/1)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    results = {}
    for spec in a.scenarios:
        name, rest = spec.split("=", 1)
        ckpt, ep, dispatch, prompts, act, dp = rest.split(":")
        os.environ["DSMATH_MOE_DISPATCH"] = dispatch
        os.environ["DSMATH_FP8_ACT"] = act
        llm = LLM(ckpt, tensor_parallel_size=world, enable_expert_parallel=ep == "1", enable_dp_attention=dp == "1",
                  num_blocks=32, block_size=8, device="cpu")
        outs = llm.generate(PROMPTS[prompts], SamplingParams(max_tokens=a.max_tokens, temperature=0.0,
                                                             return_routing=True), use_tqdm=False)
        nbytes = sum(p.numel() * p.element_size() for p in llm.model.parameters())
        sizes = [None] * world
        dist.all_gather_object(sizes, nbytes)
        results[name] = {"tokens": [o.outputs[0].token_ids for o in outs], "param_bytes": sizes,
                         "routing": [o.outputs[0].routing.tolist() for o in outs],
                         "fp8_params": sum(p.dtype == torch.float8_e4m3fn for p in llm.model.parameters())}
    if dist.get_rank() == 0:
        with open(a.out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
