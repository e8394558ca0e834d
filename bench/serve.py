"""Serving benchmark (issue 15): N concurrent streaming clients against a live `dsmath serve` on loopback, and the
same workload through `LLM.generate` in process — the server's overhead as a tokens/s ratio.

Workload: R requests (default 2 x N), each a P-character prompt, M new tokens (ignore_eos, temperature 1,
seeded), sent by N closed-loop clients (each sends its next request when the last one finished) as streaming
/v1/completions with usage. In process: LLM.generate on the same prompts and params with max_num_seqs = N (the
same at most N sequences in flight). Both use the same engine options and torch thread count; the clients run
in this process (httpx, asyncio), the server in a subprocess.
Reported: output tokens/s, requests/s, time to first token (TTFT) and time per output token after the first
(TPOT) p50/p99 per request, and server tok/s / in-process tok/s (target >= 0.9 on the tiny CPU model at 32).
Each path runs --reps times; the fastest run counts. On a shared machine wall time mostly measures the other
jobs, so the CPU time each path spends for the same tokens is reported too (server process: /proc, in process:
process_time): in-process CPU / server CPU is the server's efficiency whatever the load.

Usage: python bench/serve.py [--model DIR] [--concurrency 32] [--requests 64] [--prompt-len 32] [--max-tokens 64]
                             [--device cpu] [--threads 1] [--json PATH]          (or: dsmath bench serve ...)
Without --model a toy checkpoint (train.toy.save_toy_checkpoint: tiny preset, char tokenizer) is written to a
temporary directory. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import torch

if __package__ and "." in __package__:  # `dsmath bench serve`: dsmath.bench.serve, installed
    from .. import model as model_pkg
    from ..train import toy
    from ._util import device_name, print_json, print_table
else:  # `python bench/serve.py` from the repo
    ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, ROOT)
    from _util import device_name, print_json, print_table

    import model as model_pkg
    from train import toy

LLM, SamplingParams = model_pkg.LLM, model_pkg.SamplingParams
SERVE_MODULE = f"{model_pkg.__name__}.serve.cli"   # model.serve.cli, or dsmath.model.serve.cli when installed


# ---------------------------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`dsmath serve` in a subprocess on a free loopback port; `with Server(...) as s:` waits until /health."""

    def __init__(self, model_dir: str, args: list[str], *, log_path: str, threads: int | None = 1,
                 startup_timeout: float = 300.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
            args = [*args, "--threads", str(threads)]
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", SERVE_MODULE, "--model", model_dir, "--port",
                                      str(self.port), *args], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.startup_timeout = startup_timeout

    def __enter__(self) -> Server:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not healthy after {self.startup_timeout} s:\n{self.output()}")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the server process so far (Linux /proc; None elsewhere)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def output(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()[-5000:]


# ---------------------------------------------------------------------------------------------- workload
def make_prompts(n: int, length: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = "0123456789+-*/= abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(alphabet) for _ in range(length)) for _ in range(n)]


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


async def one_request(client, url: str, model: str, prompt: str, max_tokens: int, seed: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "seed": seed,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0, first, last, tokens = time.perf_counter(), None, None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk.get("choices"):
                last = time.perf_counter()
                first = first or last
    return {"ttft": first - t0, "tpot": (last - first) / (tokens - 1) if tokens > 1 else None, "tokens": tokens,
            "latency": last - t0}


async def drive(url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int) -> tuple[list, float]:
    import httpx

    todo = list(enumerate(prompts))
    results = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        async def worker():
            while todo:
                i, p = todo.pop(0)
                results.append(await one_request(client, url, model, p, max_tokens, seed=i))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - t0


def engine_args(args) -> list[str]:
    out = ["--max-num-seqs", str(args.concurrency), "--block-size", str(args.block_size), "--max-num-batched-tokens",
           str(args.max_num_batched_tokens)]
    if args.num_blocks:
        out += ["--num-blocks", str(args.num_blocks)]
    if args.device:
        out += ["--device", args.device]
    if args.dtype:
        out += ["--dtype", args.dtype]
    return out + shlex.split(args.server_args)


def in_process(args, model_dir: str, prompts: list[str]) -> dict:
    llm = LLM(model_dir, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None,
              max_num_seqs=args.concurrency, block_size=args.block_size, num_blocks=args.num_blocks,
              max_num_batched_tokens=args.max_num_batched_tokens)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=args.max_tokens, ignore_eos=True)
              for i in range(len(prompts))]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)                       # warm-up
    dt = cpu = float("inf")
    for _ in range(args.reps):                                                  # best of reps
        t0, c0 = time.perf_counter(), time.process_time()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt, cpu = min(dt, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"name": "in-process LLM.generate", "requests": len(prompts), "output_tokens": tokens, "seconds": dt,
            "tokens_per_s": tokens / dt, "requests_per_s": len(prompts) / dt, "cpu_seconds": cpu}


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint with a tokenizer (default: a toy one in a temp dir)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=None, help="default: 2 x concurrency")
    ap.add_argument("--prompt-len", type=int, default=32, help="characters (the toy tokenizer: one per token)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server and the in-process run")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, default=None)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=2, help="runs of each path; the fastest counts")
    ap.add_argument("--server-args", default="", help="more `dsmath serve` options, e.g. '--step-in-thread no'")
    ap.add_argument("--json", default=None, help="also write the result JSON here")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    model_dir = args.model or toy.save_toy_checkpoint(os.path.join(tmp.name, "toy"))
    if args.num_blocks is None and args.model is None:
        args.num_blocks = -(-args.concurrency * (args.prompt_len + args.max_tokens) // args.block_size) + 8
    n = args.requests or 2 * args.concurrency
    prompts = make_prompts(n, args.prompt_len)
    base = in_process(args, model_dir, prompts)
    name = os.path.basename(os.path.normpath(model_dir))
    with Server(model_dir, engine_args(args), log_path=os.path.join(tmp.name, "server.log"),
                threads=args.threads) as srv:
        asyncio.run(drive(srv.url, name, prompts[:2], args.max_tokens, 2))      # warm-up
        runs = []
        for _ in range(args.reps):                                              # best of reps
            c0 = srv.cpu_seconds()
            results, dt = asyncio.run(drive(srv.url, name, prompts, args.max_tokens, args.concurrency))
            c1 = srv.cpu_seconds()
            runs.append((dt, results, None if c0 is None or c1 is None else c1 - c0))
        dt, results, cpu = min(runs, key=lambda r: r[0])
        cpu = min((r[2] for r in runs if r[2] is not None), default=None)
    tokens = sum(r["tokens"] for r in results)
    ttft, tpot = [r["ttft"] for r in results], [r["tpot"] for r in results if r["tpot"] is not None]
    served = {"name": f"server, {args.concurrency} streams", "requests": n, "output_tokens": tokens, "seconds": dt,
              "tokens_per_s": tokens / dt, "requests_per_s": n / dt,
              "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
              "tpot_p50_ms": 1e3 * percentile(tpot, 50), "tpot_p99_ms": 1e3 * percentile(tpot, 99)}
    served["vs_in_process"] = served["tokens_per_s"] / base["tokens_per_s"]
    served["cpu_seconds"] = cpu
    served["cpu_vs_in_process"] = base["cpu_seconds"] / cpu if cpu else None
    result = {"device": device_name(torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))),
              "model": args.model or "toy (tiny preset, char tokenizer)", "concurrency": args.concurrency,
              "requests": n, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "threads": args.threads,
              "rows": [base, served], "server_vs_in_process": served["vs_in_process"],
              "server_cpu_vs_in_process": served["cpu_vs_in_process"], "server_args": args.server_args,
              "median_ttft_ms": statistics.median(ttft) * 1e3}
    print(f"# {result['device']}  {result['model']}  {n} requests x {args.max_tokens} tokens, prompts "
          f"{args.prompt_len} chars, {args.concurrency} concurrent")
    print_table(result["rows"], [("name", "path", "s"), ("requests", "req", "d"), ("output_tokens", "tokens", "d"),
                                 ("seconds", "s", ".2f"), ("tokens_per_s", "tok/s", ".1f"),
                                 ("requests_per_s", "req/s", ".2f"), ("ttft_p50_ms", "TTFT p50 ms", ".1f"),
                                 ("ttft_p99_ms", "TTFT p99 ms", ".1f"), ("tpot_p50_ms", "TPOT p50 ms", ".2f"),
                                 ("tpot_p99_ms", "TPOT p99 ms", ".2f"), ("vs_in_process", "x in-proc", ".3f"),
                                 ("cpu_seconds", "CPU s", ".2f"), ("cpu_vs_in_process", "x in-proc CPU", ".3f")])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print_json(result)
    tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
