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
import functools
import logging
import os
import socket
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
    srv.add_argument("--engine-process", default="auto", choices=["auto", "yes", "no"],
                     help="run the engine in its own process, beside the HTTP server (auto: yes with a GPU or >= 2 "
                          "CPUs; see build_engine)")
    srv.add_argument("--engine-cpus", default="auto",
                     help="CPU engines with --engine-process: pin the engine process to its own CPUs and the HTTP "
                          "front end to the others. auto: on a CPU device with --threads T, when this process may "
                          "use more than T CPUs (the last T go to the engine); no: never; or a list, e.g. 2,3")
    srv.add_argument("--step-in-thread", default="auto", choices=["auto", "yes", "no"],
                     help="--engine-process no only: run the model half of each step in a worker thread so HTTP "
                          "work overlaps it (auto: on CUDA, where the GPU runs while Python serves; on CPU the GIL "
                          "serialises both anyway)")
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


def build_llm(model: str, **kwargs):
    """The server's LLM (in this process or in the engine process, which calls this). Under tensor / expert
    parallelism (torchrun): rank 0 gets a Leader (it broadcasts each step to the other ranks), the other ranks a
    bare LLM to run model.parallel.follow with."""
    from ..engine import LLM

    parallel = kwargs.get("tensor_parallel_size", 1) > 1 or kwargs.get("enable_expert_parallel", False)
    if parallel:  # an idle server sends nothing for hours: collectives must wait that long
        import datetime

        from ..parallel import init_distributed
        init_distributed(kwargs.get("tensor_parallel_size", 1), kwargs.get("device"),
                         timeout=datetime.timedelta(days=7))
    llm = LLM(model, **kwargs)
    if llm.parallel is not None:
        from ..parallel import Leader
        if llm.parallel.rank != 0:
            return llm
        llm = Leader(llm)
    if llm.tokenizer is None:
        raise ValueError(f"{model} has no tokenizer; pass --tokenizer DIR")
    return llm


def use_engine_process(args) -> bool:
    """--engine-process auto: yes when the device is a GPU or this process may use >= 2 CPUs. Then the HTTP work
    (parsing, tokenizing, one SSE chunk per token per stream) runs on its own core while the engine steps,
    instead of taking turns with the step under one GIL: on the tiny CPU model that took 0.28x of LLM.generate's
    tokens/s to 0.76x on an idle machine (bench/RESULTS.md, issues 15 and 15b). On a GPU the step releases the
    GIL only while it waits for the device, and its Python part (scheduling, inputs, sampling, bookkeeping) still
    competes with the HTTP work and with the 5 ms GIL switch interval, so the engine process is the better default
    there too (vLLM V1's choice). One CPU: nothing to run beside the step, so in process (no pickling, no second
    interpreter)."""
    if args.tensor_parallel_size > 1 or args.enable_expert_parallel:
        # every rank runs the model in its own process already (torchrun); rank 0's engine steps in the process
        # that holds the process group, so there is no engine process to split off
        if args.engine_process == "yes":
            raise SystemExit("dsmath serve: --engine-process yes: not with --tensor-parallel-size > 1 or "
                             "--enable-expert-parallel (rank 0's engine must run in the process of its process group)")
        return False
    if args.engine_process != "auto":
        return args.engine_process == "yes"
    if not hasattr(socket, "AF_UNIX"):      # the engine process talks over a Unix socket pair (POSIX)
        return False
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return torch.device(device).type == "cuda" or cpus >= 2


def engine_cpus(args) -> tuple[frozenset[int], frozenset[int]] | None:
    """(engine CPUs, front-end CPUs) per --engine-cpus, or None (no pinning). auto pins CPU engines only: on a GPU
    the engine process mostly waits for the device and needs no core of its own (nothing measured there); without
    --threads torch's threads would use every CPU, so nothing is left to split."""
    spec = args.engine_cpus.strip().lower()
    if spec in ("no", "none", "off"):
        return None
    if spec != "auto":
        try:
            mine = frozenset(int(c) for c in spec.split(","))
        except ValueError:
            raise SystemExit(f"dsmath serve: --engine-cpus: expected auto, no or a list like 2,3, got "
                             f"{spec!r}") from None
        allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else mine
        if not mine <= allowed or not allowed - mine:
            raise SystemExit(f"dsmath serve: --engine-cpus: {sorted(mine)} must be a proper subset of the CPUs this "
                             f"process may use, {sorted(allowed)}")
        return mine, frozenset(allowed - mine)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type != "cpu" or not args.threads:
        return None
    from ..engine.engine_core import split_cpus

    return split_cpus(args.threads)


def build_engine(args):
    from ..engine import AsyncLLM

    kwargs = dict(dtype=getattr(torch, args.dtype) if args.dtype else None, device=args.device,
                  tokenizer=args.tokenizer, num_blocks=args.num_blocks, block_size=args.block_size,
                  gpu_memory_fraction=args.gpu_memory_fraction, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                  enable_prefix_caching=args.enable_prefix_caching, enforce_eager=args.enforce_eager, seed=args.seed,
                  cpu_kv_cache_gib=args.cpu_kv_cache_gib, generation_config=args.generation_config,
                  logprobs_mode=args.logprobs_mode, max_logprobs=args.max_logprobs,
                  allow_long_max_model_len=args.allow_long_max_model_len, kv_cache_dtype=args.kv_cache_dtype,
                  tensor_parallel_size=args.tensor_parallel_size, enable_expert_parallel=args.enable_expert_parallel)
    front = dict(max_waiting_requests=args.max_waiting_requests, stream_interval=args.stream_interval)
    try:
        if use_engine_process(args):
            # this process has imported but run nothing yet: on a CPU-only host fork is safe and saves the engine
            # process a second import of torch & co (engine_core.py: start methods)
            method = None if torch.cuda.is_available() else "fork"
            cpus = engine_cpus(args)
            engine = AsyncLLM.with_engine_process(functools.partial(build_llm, args.model, **kwargs),
                                                  torch_threads=args.threads, start_method=method,
                                                  engine_cpus=cpus[0] if cpus else None, **front)
            if cpus:
                from ..engine.engine_core import pin_process

                pin_process(cpus[1])
                logging.getLogger("dsmath.serve").info("engine process on CPUs %s, HTTP front end on %s",
                                                       sorted(cpus[0]), sorted(cpus[1]))
            return engine
        llm = build_llm(args.model, **kwargs)
    except (RuntimeError, ValueError) as e:
        raise SystemExit(f"dsmath serve: {e}") from e
    if getattr(llm, "parallel", None) is not None and llm.parallel.rank != 0:
        return llm  # a follower rank: main() runs model.parallel.follow on it
    in_thread = llm.device.type == "cuda" if args.step_in_thread == "auto" else args.step_in_thread == "yes"
    return AsyncLLM(llm, step_in_thread=in_thread, **front)


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
