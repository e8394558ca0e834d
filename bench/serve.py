"""Serving benchmark (issue 15): N concurrent streaming clients against a live `dsmath serve` on loopback, and the
same workload through `LLM.generate` in process — the server's overhead as a tokens/s ratio.

Workload: R requests (default 2 x N), each a P-character prompt, M new tokens (ignore_eos, temperature 1,
seeded), sent by N closed-loop clients (each sends its next request when the last one finished) as streaming
/v1/completions with usage. In process: LLM.generate on the same prompts and params with max_num_seqs = N (the
same at most N sequences in flight). Both use the same engine options and torch thread count; the clients run
in this process (asyncio: a light raw HTTP/1.1 client by default, httpx with --client httpx), the server in a
subprocess (`dsmath serve`, by default with its engine in a child process: --server-args '--engine-process no'
for the one-process server; that process pinned to CPUs of its own, '--engine-cpus no' to let it float, and then
the clients run off its CPUs, as remote clients would). The clients run at the lowest priority (--client-priority
idle): stand-ins for remote machines, they take only the CPU time the server leaves.
Reported: output tokens/s, requests/s, time to first token (TTFT) and time per output token after the first
(TPOT) p50/p99 per request, and server tok/s / in-process tok/s (target >= 0.9 on the tiny CPU model at 32).
Each path runs --reps times, interleaved; the fastest run counts (and every rep's ratio is listed). On a shared
machine wall time mostly measures the other jobs, so the CPU time each process spends for the same tokens is
reported too (/proc for the server's processes, process_time for in-process and the clients): in-process CPU /
engine-process CPU is what the split costs the process that runs the model, in-process CPU / server CPU (front end
+ engine) the server's whole efficiency, whatever the load.

Usage: python bench/serve.py [--model DIR] [--concurrency 32] [--requests 64] [--prompt-len 32] [--max-tokens 64]
                             [--device cpu] [--threads 1] [--json PATH]          (or: dsmath bench serve ...)
Without --model a toy checkpoint (train.toy.save_toy_checkpoint: tiny preset, char tokenizer) is written to a
temporary directory. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

    def cpu_seconds(self) -> dict[str, float] | None:
        """User + system CPU seconds so far of the server process ("front") and of its child processes, e.g. the
        engine-core process ("core"); Linux /proc, None elsewhere."""
        try:
            front = proc_cpu_seconds(self.proc.pid)
            core = sum(proc_cpu_seconds(c) for c in child_pids(self.proc.pid))
        except (OSError, ValueError, IndexError):
            return None
        return {"front": front, "core": core}

    def engine_cpus(self) -> set[int] | None:
        """The CPUs the engine process is pinned to (`--engine-cpus`), None when it may use all of ours."""
        if not hasattr(os, "sched_getaffinity"):
            return None
        try:
            pids = child_pids(self.proc.pid)
            mine = os.sched_getaffinity(0)
            cpus = os.sched_getaffinity(pids[0]) if pids else mine
        except (OSError, ValueError):
            return None
        return set(cpus) if cpus < mine else None

    def output(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()[-5000:]


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one live process (Linux /proc/PID/stat, fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The live child processes of `pid` (Linux /proc/PID/task/*/children)."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


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


class _ChunkedEvents(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, parsed as bytes arrive (one callback per read, no await per event):
    the status line and headers, the chunked body, and the server-sent events in it, each timed on arrival."""

    def __init__(self):
        self.transport, self.buf, self.waiter = None, b"", None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"the server closed the connection ({exc})"))

    def start(self, request: bytes) -> asyncio.Future:
        self.head, self.times, self.usage, self.body, self.events = None, [], None, b"", b""
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.head is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head, self.buf = self.buf[:end].decode("latin-1").lower(), self.buf[end + 4:]
            if not self.head.startswith("http/1.1 200"):
                n = int(self.head.split("content-length:", 1)[1].split("\r\n", 1)[0]) \
                    if "content-length:" in self.head else 0
                self.error = self.head.splitlines()[0]
                self.need = n
            elif "transfer-encoding: chunked" not in self.head:
                self.waiter.set_exception(RuntimeError(f"expected a chunked event stream, got {self.head!r}"))
                return
        if not self.head.startswith("http/1.1 200"):
            if len(self.buf) >= self.need:
                self.waiter.set_exception(RuntimeError(f"{self.error}: {self.buf[:self.need]!r}"))
            return
        now = time.perf_counter()
        while True:                                   # whole chunks: size line, data, CRLF
            line = self.buf.find(b"\r\n")
            if line < 0:
                return
            size = int(self.buf[:line], 16)
            if len(self.buf) < line + 2 + size + 2:
                return
            chunk, self.buf = self.buf[line + 2:line + 2 + size], self.buf[line + 2 + size + 2:]
            if size == 0:
                self.waiter.set_result((self.times, self.usage))
                return
            self.events += chunk
            *events, self.events = self.events.split(b"\n\n")
            for ev in events:
                if not ev.startswith(b"data: ") or ev == b"data: [DONE]":
                    continue
                if b'"usage":null' in ev:
                    self.times.append(now)
                else:
                    self.usage = json.loads(ev[6:]).get("usage")


class RawClient:
    """The light client (--client raw, the default): one keep-alive HTTP/1.1 connection (an asyncio Protocol) that
    POSTs a JSON body and parses the chunked event stream as it arrives, timing every event and parsing only the
    JSON of the usage event. httpx (--client httpx) spends ~100 µs of CPU per streamed event — as much as the
    server's per-token work — and on a 2-core machine the clients' CPU is taken from the server's; this one
    spends a few µs."""

    def __init__(self, url: str, api_key: str | None = None):
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        self.host, self.port, self.proto = host, int(port), None
        self.auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""

    async def stream(self, path: str, body: dict) -> tuple[list[float], dict | None]:
        """(arrival time of every data event but [DONE] and the usage event, the usage dict)."""
        if self.proto is None:
            _, self.proto = await asyncio.get_running_loop().create_connection(_ChunkedEvents, self.host, self.port)
        data = json.dumps(body).encode()
        return await self.proto.start(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\n{self.auth}Content-Type: "
                                      f"application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)

    async def close(self) -> None:
        if self.proto is not None:
            self.proto.transport.close()


async def one_raw_request(client: RawClient, model: str, prompt: str, max_tokens: int, seed: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "seed": seed,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, usage = await client.stream("/v1/completions", body)
    tokens = usage["completion_tokens"]
    return {"ttft": times[0] - t0, "tpot": (times[-1] - times[0]) / (tokens - 1) if tokens > 1 else None,
            "tokens": tokens, "latency": times[-1] - t0}


async def drive(url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int,
                client: str = "raw", api_key: str | None = None) -> tuple[list, float]:
    """Closed-loop: `concurrency` workers, each sending its next request when the last one finished."""
    todo = list(enumerate(prompts))
    results = []
    if client == "raw":
        conns = [RawClient(url, api_key) for _ in range(concurrency)]

        async def worker(conn):
            while todo:
                i, p = todo.pop(0)
                results.append(await one_raw_request(conn, model, p, max_tokens, seed=i))

        t0 = time.perf_counter()
        try:
            await asyncio.gather(*(worker(c) for c in conns))
        finally:
            for c in conns:
                await c.close()
        return results, time.perf_counter() - t0

    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=None, limits=limits) as hc:
        async def hworker():
            while todo:
                i, p = todo.pop(0)
                results.append(await one_request(hc, url, model, p, max_tokens, seed=i))

        t0 = time.perf_counter()
        await asyncio.gather(*(hworker() for _ in range(concurrency)))
        return results, time.perf_counter() - t0


POLICIES = {"idle": "SCHED_IDLE", "batch": "SCHED_BATCH"}


@contextlib.contextmanager
def client_priority(kind: str):
    """The clients stand in for remote machines, which would cost the server nothing. Sharing its CPUs here, they
    should at least not take them from it. "idle" (the default) runs them as SCHED_IDLE (Linux): they get the CPU
    only when the server's front end does not want it, so a wave of finished streams is written out and the next
    requests are taken in before the clients parse anything. "batch" (SCHED_BATCH): a client woken by a streamed
    event waits for the server's turn to end instead of preempting it, but then competes as an equal. "normal":
    the default policy. Measured on the 2-vCPU dev VM, 60 interleaved pairs each (bench/RESULTS.md, 2026-12-02):
    median server / in-process ratio 0.873 (batch) -> 0.903 (idle), TTFT p50 34-47 -> 29-35 ms; normal -> batch
    had cut the client CPU 0.37-0.49 -> 0.23-0.29 s. Yields the policy in force; a policy this OS refuses is
    reported on stderr (the run then uses the normal one, and its JSON says so)."""
    if kind not in (*POLICIES, "normal"):
        raise ValueError(f"client_priority: kind must be one of {[*POLICIES, 'normal']}, got {kind!r}")
    name = POLICIES.get(kind)
    if name is None or not hasattr(os, name):
        if name is not None:
            print(f"client_priority: {name} is not available here; the clients run with the normal policy",
                  file=sys.stderr)
        yield "normal"
        return
    old = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        os.sched_setscheduler(0, getattr(os, name), os.sched_param(0))
    except OSError as e:
        print(f"client_priority: {name} refused ({e}); the clients run with the normal policy", file=sys.stderr)
        yield "normal"
        return
    try:
        yield kind
    finally:
        os.sched_setscheduler(0, old[0], old[1])   # the in-process runs must not stay at a lower priority


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


def in_process(args, model_dir: str, prompts: list[str]):
    """LLM.generate on the same workload: returns run() -> (seconds, CPU seconds, output tokens) of one pass."""
    llm = LLM(model_dir, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None,
              max_num_seqs=args.concurrency, block_size=args.block_size, num_blocks=args.num_blocks,
              max_num_batched_tokens=args.max_num_batched_tokens)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=args.max_tokens, ignore_eos=True)
              for i in range(len(prompts))]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)                       # warm-up

    def run() -> tuple[float, float, int]:
        t0, c0 = time.perf_counter(), time.process_time()
        outs = llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t0, time.process_time() - c0, sum(len(c.token_ids) for o in outs
                                                                        for c in o.outputs)
    return run


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
    ap.add_argument("--reps", type=int, default=3, help="runs of each path, interleaved; the fastest counts")
    ap.add_argument("--client", default="raw", choices=["raw", "httpx"],
                    help="raw: the light asyncio-streams client (RawClient); httpx: httpx's AsyncClient")
    ap.add_argument("--client-priority", default="idle", choices=["idle", "batch", "normal"],
                    help="scheduling of the clients while they drive the server (see client_priority)")
    ap.add_argument("--server-args", default="", help="more `dsmath serve` options, e.g. '--step-in-thread no'")
    ap.add_argument("--json", default=None, help="also write the result JSON here")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = load_average()
    tmp = tempfile.TemporaryDirectory()
    model_dir = args.model or toy.save_toy_checkpoint(os.path.join(tmp.name, "toy"))
    if args.num_blocks is None and args.model is None:
        args.num_blocks = -(-args.concurrency * (args.prompt_len + args.max_tokens) // args.block_size) + 8
    n = args.requests or 2 * args.concurrency
    prompts = make_prompts(n, args.prompt_len)
    run_in_process = in_process(args, model_dir, prompts)
    name = os.path.basename(os.path.normpath(model_dir))
    with Server(model_dir, engine_args(args), log_path=os.path.join(tmp.name, "server.log"),
                threads=args.threads) as srv:
        asyncio.run(drive(srv.url, name, prompts[:2], args.max_tokens, 2, args.client))      # warm-up
        # a pinned engine process (dsmath serve --engine-cpus): the clients stay off its CPUs, as remote clients
        # would be; the in-process runs use the engine's CPUs
        engine_cpus = srv.engine_cpus()
        all_cpus = os.sched_getaffinity(0) if engine_cpus else None
        local, runs, policies = [], [], set()
        for _ in range(args.reps):      # interleaved, so that both paths see the same (shared machine's) load
            if engine_cpus:             # the same core computes both paths (vCPUs of one VM need not be equal)
                os.sched_setaffinity(0, engine_cpus)
            local.append(run_in_process())
            if engine_cpus:
                os.sched_setaffinity(0, all_cpus - engine_cpus)
            with client_priority(args.client_priority) as policy:
                c0, k0 = srv.cpu_seconds(), time.process_time()
                results, dt = asyncio.run(drive(srv.url, name, prompts, args.max_tokens, args.concurrency,
                                                args.client))
                c1, k1 = srv.cpu_seconds(), time.process_time()
            if engine_cpus:
                os.sched_setaffinity(0, all_cpus)
            cpu = None if c0 is None or c1 is None else {k: c1[k] - c0[k] for k in c0}
            runs.append((dt, results, cpu, k1 - k0))
            policies.add(policy)
        dt, results, _, _ = min(runs, key=lambda r: r[0])
        cpus = [r[2] for r in runs if r[2] is not None]
        client_cpu = min(r[3] for r in runs)
    best = min(local)
    base = {"name": "in-process LLM.generate", "requests": n, "output_tokens": best[2], "seconds": best[0],
            "tokens_per_s": best[2] / best[0], "requests_per_s": n / best[0], "cpu_seconds": min(r[1] for r in local)}
    paired = [lr[0] / sr[0] for lr, sr in zip(local, runs)]     # per rep: in-process seconds / server seconds
    tokens = sum(r["tokens"] for r in results)
    ttft, tpot = [r["ttft"] for r in results], [r["tpot"] for r in results if r["tpot"] is not None]
    served = {"name": f"server, {args.concurrency} streams", "requests": n, "output_tokens": tokens, "seconds": dt,
              "tokens_per_s": tokens / dt, "requests_per_s": n / dt,
              "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
              "tpot_p50_ms": 1e3 * percentile(tpot, 50), "tpot_p99_ms": 1e3 * percentile(tpot, 99)}
    served["vs_in_process"] = served["tokens_per_s"] / base["tokens_per_s"]
    if cpus:   # the least CPU any run took, per process (CPU time varies less with the machine's load than wall)
        served["cpu_seconds"] = min(c["front"] + c["core"] for c in cpus)
        served["front_cpu_seconds"] = min(c["front"] for c in cpus)
        served["core_cpu_seconds"] = min(c["core"] for c in cpus) or None    # None: no engine process
        served["cpu_vs_in_process"] = base["cpu_seconds"] / served["cpu_seconds"]
        core = served["core_cpu_seconds"] or served["cpu_seconds"]          # the process that runs the model
        served["engine_cpu_vs_in_process"] = base["cpu_seconds"] / core
    served["client_cpu_seconds"] = client_cpu
    result = {"device": device_name(torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))),
              "model": args.model or "toy (tiny preset, char tokenizer)", "concurrency": args.concurrency,
              "requests": n, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "threads": args.threads,
              "rows": [base, served], "server_vs_in_process": served["vs_in_process"],
              "server_cpu_vs_in_process": served.get("cpu_vs_in_process"),
              "engine_cpu_vs_in_process": served.get("engine_cpu_vs_in_process"), "server_args": args.server_args,
              "median_ttft_ms": statistics.median(ttft) * 1e3, "load_average": [load0, load_average()],
              "paired_ratios": [round(x, 3) for x in paired], "median_paired_ratio": statistics.median(paired),
              "client": args.client, "client_priority": "/".join(sorted(policies)) or None,
              "engine_cpus": sorted(engine_cpus) if engine_cpus else None,
              "cpus": os.cpu_count()}
    print(f"# {result['device']}  {result['model']}  {n} requests x {args.max_tokens} tokens, prompts "
          f"{args.prompt_len} chars, {args.concurrency} concurrent, {args.client} client "
          f"({result['client_priority']}), "
          f"load average {result['load_average']}; per-rep wall ratios {result['paired_ratios']} (median "
          f"{result['median_paired_ratio']:.3f}); engine process on CPUs "
          f"{result['engine_cpus'] or 'any'}")
    print_table(result["rows"], [("name", "path", "s"), ("requests", "req", "d"), ("output_tokens", "tokens", "d"),
                                 ("seconds", "s", ".2f"), ("tokens_per_s", "tok/s", ".1f"),
                                 ("requests_per_s", "req/s", ".2f"), ("ttft_p50_ms", "TTFT p50 ms", ".1f"),
                                 ("ttft_p99_ms", "TTFT p99 ms", ".1f"), ("tpot_p50_ms", "TPOT p50 ms", ".2f"),
                                 ("tpot_p99_ms", "TPOT p99 ms", ".2f"), ("vs_in_process", "x in-proc", ".3f"),
                                 ("cpu_seconds", "CPU s", ".2f"), ("core_cpu_seconds", "engine CPU s", ".2f"),
                                 ("front_cpu_seconds", "front CPU s", ".2f"),
                                 ("client_cpu_seconds", "client CPU s", ".2f"),
                                 ("cpu_vs_in_process", "x in-proc CPU", ".3f"),
                                 ("engine_cpu_vs_in_process", "x in-proc engine CPU", ".3f")])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print_json(result)
    tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
