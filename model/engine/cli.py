"""One-off generation from the command line.

    python -m model.engine.cli --model /path/to/checkpoint "What is 2 + 3?" --max-tokens 64 --stream
    python -m model.engine.cli --preset tiny --ids 5,6,7 --n 2 --temperature 0.8 --seed 1   # random weights
    torchrun --nproc-per-node 8 -m model.engine.cli --model DeepSeek-V3/ --tensor-parallel-size 8 \
        --enable-expert-parallel --enable-dp-attention --ids 1,2,3       # every rank prints the same output
"""

import argparse
import sys

import torch


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_argument_group("model")
    src.add_argument("--model", help="checkpoint directory (config.json + safetensors [+ tokenizer])")
    src.add_argument("--preset", help="random-weight preset instead of --model (tiny, tiny-v3, tiny-qwen3, v2-lite)")
    src.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    src.add_argument("--device", default=None)
    src.add_argument("--num-blocks", type=int, default=None)
    src.add_argument("--block-size", type=int, default=64)
    par = ap.add_argument_group("parallelism (under torchrun --nproc-per-node N; model/parallel.py)")
    par.add_argument("--tensor-parallel-size", type=int, default=1)
    par.add_argument("--enable-expert-parallel", action="store_true")
    par.add_argument("--enable-dp-attention", action="store_true")
    src.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                     help="fp8: e4m3 latent cache with per-token scales (MLA models)")
    gen = ap.add_argument_group("sampling")
    gen.add_argument("prompt", nargs="*", help="prompt text (needs a tokenizer)")
    gen.add_argument("--ids", help="prompt as comma-separated token ids")
    gen.add_argument("--n", type=int, default=1)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they come (n=1)")
    args = ap.parse_args(argv)
    if bool(args.model) == bool(args.preset):
        ap.error("give exactly one of --model and --preset")
    if bool(args.prompt) == bool(args.ids):
        ap.error("give a text prompt or --ids")
    return args


def build(args):
    from . import LLM

    dtype = getattr(torch, args.dtype) if args.dtype else None
    kw = dict(num_blocks=args.num_blocks, block_size=args.block_size, kv_cache_dtype=args.kv_cache_dtype)
    if args.model:
        return LLM(args.model, dtype=dtype, device=args.device, tensor_parallel_size=args.tensor_parallel_size,
                   enable_expert_parallel=args.enable_expert_parallel, enable_dp_attention=args.enable_dp_attention,
                   **kw)
    if args.tensor_parallel_size > 1:
        raise SystemExit("--tensor-parallel-size: needs --model (each rank loads its slices of a checkpoint)")
    from ..modeling import MoEForCausalLM

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    m = MoEForCausalLM.from_preset(args.preset, dtype=dtype, device=device)
    return LLM(m, **kw)


def main(argv=None) -> int:
    from . import SamplingParams

    args = parse(argv)
    llm = build(args)
    prompt = [int(t) for t in args.ids.split(",")] if args.ids else " ".join(args.prompt)
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed, stop=args.stop, logprobs=0)
    if args.stream and args.n == 1:
        for ev in llm.stream([prompt], params):
            sys.stdout.write(ev.text if ev.text is not None else f"{ev.token_id} ")
            sys.stdout.flush()
        print()
        return 0
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    for c in out.outputs:
        body = c.text if c.text is not None else " ".join(map(str, c.token_ids))
        mean_lp = sum(c.token_logprobs) / max(1, len(c.token_logprobs))
        print(f"[{c.index}] ({c.finish_reason}, {len(c.token_ids)} tokens, mean logprob {mean_lp:.3f}) {body}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
