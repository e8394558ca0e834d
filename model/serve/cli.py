"""`dsmath serve`: an OpenAI-compatible HTTP server for a checkpoint (python -m model.serve.cli from the repo).

    dsmath serve --model /path/to/DeepSeek-V2-Lite --port 8000 --api-key "$KEY"
    torchrun --nproc-per-node 8 -m model.serve.cli --model DeepSeek-V3/ --tensor-parallel-size 8 \
        --enable-expert-parallel                     # rank 0 serves HTTP, the others replay its steps
    curl -H "Authorization: Bearer $KEY" localhost:8000/v1/chat/completions \\
         -d '{"model": "DeepSeek-V2-Lite", "messages": [{"role": "user", "content": "2+2?"}]}'

Binds to 127.0.0.1 unless --host says otherwise. Needs the `serve` extra (pip install "dsmath[serve]": fastapi,
uvicorn); the engine itself does not.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    srv = ap.add_argument_group("server")
    srv.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer)")
    srv.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    srv.add_argument("--served-model-name", default=None, help="the `model` clients send (default: the directory "
                                                                  "name)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=os.environ.get("DSMATH_API_KEY"),
                     help="require `Authorization: Bearer KEY` on /v1 (default: $DSMATH_API_KEY; none: open)")
    srv.add_argument("--chat-template", default=None, help="Jinja chat template (string or file) overriding the "
                                                           "tokenizer's")
    srv.add_argument("--max-waiting-requests", type=int, default=256,
                     help="bounded waiting queue: beyond it requests get HTTP 429")
    srv.add_argument("--shutdown-timeout", type=float, default=30.0,
                     help="on SIGTERM, seconds running requests may take before they are aborted")
    srv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    srv.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    srv.add_argument("--stream-interval", type=int, default=1,
                     help="send a stream's tokens every this many (the first and last at once); >1 trades "
                          "streaming granularity for less per-token HTTP work")
    srv.add_argument("--step-in-thread", default="auto", choices=["auto", "yes", "no"],
                     help="run the model half of each step in a worker thread so HTTP work overlaps it (auto: "
                          "on CUDA, where the GPU runs while Python serves; on CPU the GIL serialises both anyway)")
    eng = ap.add_argument_group("engine")
    eng.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    eng.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    eng.add_argument("--max-model-len", type=int, default=None)
    eng.add_argument("--allow-long-max-model-len", action="store_true",
                     help="allow --max-model-len beyond the model's max_position_embeddings (warns)")
    eng.add_argument("--max-num-seqs", type=int, default=256)
    eng.add_argument("--max-num-batched-tokens", type=int, default=8192)
    eng.add_argument("--num-blocks", type=int, default=None)
    eng.add_argument("--block-size", type=int, default=64)
    eng.add_argument("--gpu-memory-fraction", type=float, default=0.9)
    eng.add_argument("--cpu-kv-cache-gib", type=float, default=1.0)
    eng.add_argument("--enable-prefix-caching", action="store_true")
    eng.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    eng.add_argument("--seed", type=int, default=0)
    eng.add_argument("--generation-config", default="auto",
                     help="'auto' (the checkpoint's generation_config.json), 'vllm' (ignore it) or a path")
    eng.add_argument("--logprobs-mode", default="raw_logprobs",
                     choices=["raw_logprobs", "processed_logprobs", "raw_logits", "processed_logits"])
    eng.add_argument("--max-logprobs", type=int, default=20)
    eng.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                     help="fp8: e4m3 latent cache with per-token scales (MLA models)")
    par = ap.add_argument_group("parallelism (under torchrun --nproc-per-node N; rank 0 serves HTTP)")
    par.add_argument("--tensor-parallel-size", type=int, default=1)
    par.add_argument("--enable-expert-parallel", action="store_true")
    par.add_argument("--enable-dp-attention", action="store_true",
                     help="not for serving: the offline LLM.generate only (refused here)")
    args = ap.parse_args(argv)
    if args.enable_dp_attention:
        ap.error("--enable-dp-attention: the server runs heads-split attention (data-parallel attention serves "
                 "the offline LLM.generate only)")
    return args


def build_engine(args):
    """AsyncLLM over the LLM (on rank 0 of a tensor-parallel run, over a Leader; other ranks get a bare LLM to run
    model.parallel.follow with)."""
    from ..engine import LLM, AsyncLLM

    if args.tensor_parallel_size > 1:  # an idle server sends nothing for hours: collectives must wait that long
        import datetime

        from ..parallel import init_distributed
        init_distributed(args.tensor_parallel_size, args.device, timeout=datetime.timedelta(days=7))
    llm = LLM(args.model, dtype=getattr(torch, args.dtype) if args.dtype else None, device=args.device,
              tokenizer=args.tokenizer, num_blocks=args.num_blocks, block_size=args.block_size,
              gpu_memory_fraction=args.gpu_memory_fraction, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
              enable_prefix_caching=args.enable_prefix_caching, enforce_eager=args.enforce_eager, seed=args.seed,
              cpu_kv_cache_gib=args.cpu_kv_cache_gib, generation_config=args.generation_config,
              logprobs_mode=args.logprobs_mode, max_logprobs=args.max_logprobs,
              allow_long_max_model_len=args.allow_long_max_model_len,
              tensor_parallel_size=args.tensor_parallel_size, enable_expert_parallel=args.enable_expert_parallel,
              kv_cache_dtype=args.kv_cache_dtype)
    if llm.parallel is not None:
        from ..parallel import Leader
        if llm.parallel.rank != 0:
            return llm
        llm = Leader(llm)
    if llm.tokenizer is None:
        raise SystemExit(f"dsmath serve: {args.model} has no tokenizer; pass --tokenizer DIR")
    in_thread = llm.device.type == "cuda" if args.step_in_thread == "auto" else args.step_in_thread == "yes"
    return AsyncLLM(llm, max_waiting_requests=args.max_waiting_requests, step_in_thread=in_thread,
                    stream_interval=args.stream_interval)


def main(argv=None) -> int:
    args = parse(argv)
    try:
        from .api_server import build_app, run
    except ImportError as e:  # fastapi / uvicorn are an optional extra
        print(f"dsmath serve needs fastapi and uvicorn ({e}); pip install 'dsmath[serve]'", file=sys.stderr)
        return 1
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = build_engine(args)
    if not hasattr(engine, "llm"):  # a rank > 0 of a tensor-parallel server: replay rank 0's steps
        from ..parallel import follow
        follow(engine)
        os._exit(0)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    app = build_app(engine, model_name=name, api_key=args.api_key, chat_template=args.chat_template,
                    model_path=args.model)
    run(app, engine, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout,
        log_level=args.log_level)
    if hasattr(engine.llm, "stop"):  # tensor parallel: release the other ranks
        engine.llm.stop()
    # Drained and shut down: exit now. The interpreter's teardown of torch takes seconds (measured 2-6 s on a
    # busy 2-core machine) and keeps the process alive after the server is gone.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
