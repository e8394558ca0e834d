"""The engine in its own process (vLLM V1's EngineCore split): the model steps in a child process that never runs
HTTP, tokenization or streaming code; the front end (AsyncLLM in the server's process) feeds it over one socket.

    front end (AsyncLLM, asyncio)                        engine process (EngineCore, a plain loop)
    add_request: validate + tokenize (EngineView) ──►    ops in: [("add", [Request]), ("abort", [id]), ...]
                 one message per event-loop turn          applied between steps
    detokenize streamed text, SSE, metrics       ◄──     one message per step: every token of every
                                                          request, finished RequestOutputs, (running, free blocks)

Why: in one Python process the HTTP/SSE work (tens of µs per streamed chunk) and the engine step share one GIL,
so every chunk the server writes is time the model does not step. Split, the engine process spends on a step
what `LLM.generate` spends, plus one pickled message; the HTTP work runs beside it on another core.

- Start: `EngineCoreClient(build_llm)` starts the process, which calls `build_llm()` (a picklable callable, e.g.
  `functools.partial(LLM, "ckpt/", dtype=torch.bfloat16)`), then sends back what the front end needs (EngineView:
  tokenizer, config, limits); a failure to build is raised in the caller (RuntimeError with the child's error;
  its traceback is printed by the child and kept in `.remote_traceback`). POSIX only (a Unix socket pair).
  Start method (`start_method=` or $DSMATH_ENGINE_START_METHOD): "spawn" when CUDA is available (the child
  initialises CUDA itself; the parent never must), else "forkserver" where the platform has it: a clean server
  process with the engine modules imported once, forked per engine (fast restarts). "fork" only when the caller
  knows its process is fresh (`dsmath serve` on a CPU-only host: nothing run yet, so the child needs no second
  import of torch): a child forked from a process that has run a multi-threaded OpenMP op hangs in its first
  parallel op (checked: torch 2.13, libgomp). spawn and forkserver re-import the caller's __main__ module in the
  child, so a script that starts an engine process needs the `if __name__ == "__main__":` guard.
- Detokenization: the engine detokenizes a request incrementally only when it has stop strings (needed to stop
  it); otherwise it sends token ids and the final text, and the front end detokenizes streamed text itself
  (engine/detokenizer.py, the same code), as vLLM does — off the engine's critical path.
- CPU affinity: `cpus=` (`dsmath serve --engine-cpus`) pins the engine process to its own CPUs before torch
  starts threads; `split_cpus` picks them and `pin_process` moves the front end off them (split_cpus says why).
- Death: if the engine process dies, the socket closes; the front end fails every request in flight with the
  reason and takes no new ones (the server answers 500 to those in flight, 503 after, and /health fails). If the
  front end dies, the engine process sees the socket close and exits. It ignores SIGINT and SIGTERM (a Ctrl-C or
  a SIGTERM to the process group must not kill it under a draining server): the front end decides when it stops.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import logging
import multiprocessing as mp
import os
import pickle
import select
import signal
import socket
import struct
import time
import traceback
import weakref
from collections.abc import Callable
from types import SimpleNamespace

import torch

from .block_manager import BlockManager
from .llm_engine import LLM

log = logging.getLogger(__name__)
_HEADER = struct.Struct("<Q")


# ---- framing: 8-byte length + pickle, both directions ----------------------------------------------------------
def frame(obj) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


class Unframer:
    """Bytes in, whole messages out (a message may arrive in pieces, several in one piece)."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data: bytes) -> list:
        self.buf += data
        out, pos, n = [], 0, len(self.buf)
        view = memoryview(self.buf)
        while n - pos >= _HEADER.size:
            size = _HEADER.unpack_from(view, pos)[0]
            if n - pos - _HEADER.size < size:
                break
            out.append(pickle.loads(view[pos + _HEADER.size:pos + _HEADER.size + size]))
            pos += _HEADER.size + size
        view.release()
        if pos:
            del self.buf[:pos]
        return out


class BlockingChannel:
    """The engine process's end of the socket (and the front end's during the start-up handshake)."""

    def __init__(self, sock: socket.socket, unframer: Unframer | None = None):
        self.sock, self.unframer = sock, unframer or Unframer()

    def send(self, obj) -> None:
        self.sock.sendall(frame(obj))

    def recv(self, block: bool) -> list:
        """Every whole message that has arrived; with block, wait for at least one. EOFError: the peer is gone."""
        msgs: list = []
        while True:
            try:
                data = self.sock.recv(1 << 20, 0 if block and not msgs else socket.MSG_DONTWAIT)
            except BlockingIOError:
                return msgs
            if not data:
                raise EOFError("the peer closed the socket")
            msgs += self.unframer.feed(data)


# ---- the engine process ------------------------------------------------------------------------------------------
class EngineView:
    """What the front end knows of the engine process's LLM: its tokenizer, config and limits, and LLM's own request
    validation (`_make_request` and what it calls, bound to this object: one piece of logic, run in the front
    end, so a bad request is refused before anything is sent). Request ids are assigned here."""

    _make_request = LLM._make_request
    _check_request = LLM._check_request
    _encode = LLM._encode
    get_default_sampling_params = LLM.get_default_sampling_params

    def __init__(self, state: dict):
        self.tokenizer = state["tokenizer"]
        self.model = SimpleNamespace(config=state["config"])
        self.max_model_len = state["max_model_len"]
        self.max_num_seqs = state["max_num_seqs"]
        self.max_logprobs = state["max_logprobs"]
        self.logprobs_mode = state["logprobs_mode"]
        self.generation_defaults = state["generation_defaults"]
        self.eos_ids = state["eos_ids"]
        self.device = torch.device(state["device"])
        self.block_manager = _Blocks(state["num_blocks"], state["block_size"])
        self.runner = SimpleNamespace(routing=True if state["records_routing"] else None)
        self.sleeping: dict[str, int] = {}     # LLM.sleep() is not forwarded to the engine process: always awake
        self._next_id = 0

    @staticmethod
    def state_of(llm: LLM) -> dict:
        return {"tokenizer": llm.tokenizer, "config": llm.model.config, "max_model_len": llm.max_model_len,
                "max_num_seqs": llm.max_num_seqs, "max_logprobs": llm.max_logprobs,
                "logprobs_mode": llm.logprobs_mode, "generation_defaults": llm.generation_defaults,
                "eos_ids": llm.eos_ids, "device": str(llm.device), "num_blocks": llm.block_manager.num_blocks,
                "block_size": llm.block_manager.block_size, "records_routing": llm.runner.routing is not None}


class _Blocks:
    """The cache's geometry (for request validation); the engine process reports the free count."""
    blocks_for = BlockManager.blocks_for

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size


class EngineCore:
    """The engine process's loop: apply the front end's ops between steps, step while anything is unfinished,
    send one message per step. Blocks on the socket when idle; exits when the front end says so or is gone."""

    def __init__(self, llm: LLM, chan: BlockingChannel):
        self.llm, self.chan = llm, chan

    def stats(self) -> tuple[int, int]:
        """(requests with a running sequence, free KV blocks)."""
        llm = self.llm
        return len({s.request_id for s in llm.scheduler.running}), llm.block_manager.num_free

    def apply(self, ops: list) -> bool:
        """Apply ("add", [Request]), ("abort", [id]) and ("shutdown", None) in order; False on shutdown."""
        llm = self.llm
        for kind, payload in ops:
            if kind == "add":
                for req in payload:
                    llm._enqueue(req)          # no per-token text unless stop strings need it (front end does it)
            elif kind == "abort":
                for rid in payload:
                    llm.abort(rid)
                    llm.finished.pop(rid, None)
            elif kind == "shutdown":
                return False
        return True

    def run(self) -> None:
        llm, chan = self.llm, self.chan
        while True:
            try:
                msgs = chan.recv(block=not llm.has_unfinished())
            except EOFError:
                return                          # the front end is gone
            if not all(self.apply(ops) for ops in msgs):
                return
            if not llm.has_unfinished():
                if msgs:
                    chan.send(("stats", self.stats()))    # e.g. blocks freed by an abort
                continue
            try:
                events = llm.step()
            except Exception as e:  # noqa: BLE001 - a failing step fails its requests, not the engine
                log.exception("engine step failed; aborting the requests in flight")
                rids = list(llm.requests)
                for rid in rids:
                    llm.abort(rid)
                llm.finished.clear()
                chan.send(("failed", rids, f"engine step failed: {type(e).__name__}: {e}", self.stats()))
                continue
            finished = {}
            for ev in events:
                if ev.finish_reason is not None and ev.request_id in llm.finished:
                    finished[ev.request_id] = _portable(llm.finished.pop(ev.request_id))
            rows = [(e.request_id, e.index, e.token_id, e.logprob, e.text, e.finish_reason, e.logprobs,
                     e.stop_reason) for e in events]
            chan.send(("step", rows, finished, self.stats()))


def _portable(out):
    """A RequestOutput the front end can unpickle without touching the device: routing tensors to the CPU."""
    for o in out.outputs:
        if o.routing is not None and o.routing.device.type != "cpu":
            o.routing = o.routing.cpu()
    return out


def run_engine_core(sock: socket.socket, build_llm: Callable[[], LLM], torch_threads: int | None,
                    close_fds: tuple[int, ...] = (), cpus: frozenset[int] | None = None) -> None:
    """The engine process's entry point. close_fds: (fork) the parent's ends of engine sockets, inherited here,
    which would keep them open after the parent died (and hide its death from their engines). cpus: pin this
    process (before torch starts its threads) to these CPUs."""
    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    chan = BlockingChannel(sock)
    try:
        if cpus:
            pin_process(cpus)
        if torch_threads:
            torch.set_num_threads(torch_threads)
        llm = build_llm()
        if not isinstance(llm, LLM):
            raise TypeError(f"build_llm: expected it to return an LLM, got {type(llm).__name__}")
        chan.send(("ready", EngineView.state_of(llm)))
    except BaseException as e:  # noqa: BLE001 - reported to the front end, which raises it
        traceback.print_exc()
        chan.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))
        return
    gc.collect()
    gc.freeze()        # the model and start-up objects are never scanned again
    prof = _profiler()
    try:
        EngineCore(llm, chan).run()
    except (BrokenPipeError, ConnectionResetError):
        pass           # the front end is gone
    finally:
        if prof is not None:
            prof.disable()
            prof.dump_stats(os.environ["DSMATH_ENGINE_PROFILE"])
            log.warning("engine process profile written to %s (%d steps)", os.environ["DSMATH_ENGINE_PROFILE"],
                        llm.stats.steps)


def _profiler():
    """$DSMATH_ENGINE_PROFILE=PATH: cProfile the engine loop on a CPU-time clock (time.process_time: what the engine
    process spends, not what other processes take from it), stats written to PATH when it exits (debugging;
    `python -m pstats PATH`)."""
    if not os.environ.get("DSMATH_ENGINE_PROFILE"):
        return None
    import cProfile

    prof = cProfile.Profile(time.process_time)
    prof.enable()
    return prof


# ---- CPU affinity ------------------------------------------------------------------------------------------------
def split_cpus(engine_threads: int) -> tuple[frozenset[int], frozenset[int]] | None:
    """(engine CPUs, front-end CPUs): the last `engine_threads` CPUs this process may use for the engine process,
    the others for the front end; None when there are not more CPUs than that (or no affinity API: not Linux).

    Why (CPU engines): the front end is woken once per engine step and the kernel prefers to run a task woken by a
    Unix-socket send on the sender's CPU, so unpinned the HTTP work keeps landing on the engine's core, where it
    takes turns with the step and evicts the engine's code and data from that core's caches."""
    if not hasattr(os, "sched_getaffinity") or engine_threads < 1:
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) <= engine_threads:
        return None
    return frozenset(cpus[-engine_threads:]), frozenset(cpus[:-engine_threads])


def pin_process(cpus: frozenset[int]) -> None:
    """Restrict every thread of this process (and the threads it starts later) to `cpus` (Linux)."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:          # a thread that just ended
            pass


# ---- the front end's side --------------------------------------------------------------------------------------
def default_start_method() -> str:
    """"spawn" with CUDA (or without forkserver), else "forkserver"; $DSMATH_ENGINE_START_METHOD overrides."""
    env = os.environ.get("DSMATH_ENGINE_START_METHOD")
    if env:
        return env
    if torch.cuda.is_available() or "forkserver" not in mp.get_all_start_methods():
        return "spawn"
    return "forkserver"


class _Protocol(asyncio.Protocol):
    def __init__(self, client: EngineCoreClient):
        self.client = client

    def data_received(self, data: bytes) -> None:
        for msg in self.client.unframer.feed(data):
            self.client.on_message(msg)

    def connection_lost(self, exc) -> None:
        self.client._lost()


_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """At interpreter exit (before multiprocessing joins its children): close every engine's socket, so its
    process exits, and reap it."""
    for client in list(_LIVE):
        client.kill(timeout=5.0, close_socket=True)


class EngineCoreClient:
    """Starts the engine process and talks to it. `view` is the EngineView; after `connect` (on the running event
    loop) `on_message(msg)` receives the engine's messages and `on_lost(reason)` its death."""

    def __init__(self, build_llm: Callable[[], LLM], *, torch_threads: int | None = None,
                 start_method: str | None = None, startup_timeout: float = 900.0,
                 cpus: frozenset[int] | None = None):
        method = start_method or default_start_method()
        ctx = mp.get_context(method)
        if method == "forkserver":   # import the engine modules once, in the fork server (if it starts now)
            ctx.set_forkserver_preload([__name__])
        parent, child = socket.socketpair()
        self.sock, self.unframer = parent, Unframer()
        inherited = (parent.fileno(), *(c.sock.fileno() for c in _LIVE if c.sock.fileno() >= 0)) \
            if method == "fork" else ()
        self.proc = ctx.Process(target=run_engine_core, args=(child, build_llm, torch_threads, inherited, cpus),
                                name="dsmath-engine-core")
        self.proc.start()
        child.close()
        _LIVE.add(self)
        self.transport: asyncio.Transport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.on_message: Callable = lambda msg: None
        self.on_lost: Callable = lambda reason: None
        self.ops: list = []
        self.flush_scheduled = False
        self.closing = False
        self.dead: str | None = None
        try:
            self.view = EngineView(self._handshake(startup_timeout))
        except BaseException:
            self.kill()
            raise

    def _handshake(self, timeout: float) -> dict:
        chan = BlockingChannel(self.sock, self.unframer)
        deadline = time.monotonic() + timeout
        while True:
            msgs = []
            if select.select([self.sock], [], [], 0.5)[0]:
                try:
                    msgs = chan.recv(block=False)
                except EOFError:
                    self.proc.join(5.0)
            if msgs:
                break
            if not self.proc.is_alive():
                raise RuntimeError(f"the engine process exited during start-up (exit code {self.proc.exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the engine process was not ready after {timeout} s")
        kind, *rest = msgs[0]
        if kind == "error":
            err = RuntimeError(f"the engine process could not build its LLM: {rest[0]}")
            err.remote_traceback = rest[1]       # also printed by the engine process to its stderr
            raise err
        return rest[0]

    @property
    def connected(self) -> bool:
        return self.transport is not None and self.dead is None and not self.closing

    async def connect(self, on_message: Callable, on_lost: Callable) -> None:
        self.on_message, self.on_lost = on_message, on_lost
        if self.dead is None and not self.proc.is_alive():
            self._mark_dead()
        if self.dead is not None:
            return
        self.loop = asyncio.get_running_loop()
        self.transport, _ = await self.loop.create_unix_connection(lambda: _Protocol(self), sock=self.sock)

    # ---- ops: batched, one message per event-loop turn ---------------------------------------------------------
    def send(self, kind: str, item) -> None:
        if self.ops and self.ops[-1][0] == kind:
            self.ops[-1][1].append(item)
        else:
            self.ops.append((kind, [item]))
        if not self.flush_scheduled:
            try:
                self.loop.call_soon(self._flush)
            except RuntimeError:    # the event loop is closed: nothing will run again, the engine is going too
                return
            self.flush_scheduled = True

    def _flush(self) -> None:
        self.flush_scheduled = False
        ops, self.ops = self.ops, []
        if ops and self.transport is not None and self.dead is None:
            self.transport.write(frame(ops))

    # ---- end of life -------------------------------------------------------------------------------------------
    def _mark_dead(self) -> None:
        self.proc.join(0.2)
        code = self.proc.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        self.dead = f"the engine process died ({how}); the server must be restarted"

    def _lost(self) -> None:
        if self.closing:
            return
        self._mark_dead()
        log.error("%s", self.dead)
        self.on_lost(self.dead)

    async def close(self, timeout: float = 10.0) -> None:
        """Ask the engine process to exit; wait for it (then kill it)."""
        if self.transport is not None and self.dead is None:
            self.ops.append(("shutdown", None))
            self._flush()
        self.closing = True
        if self.transport is not None:
            self.transport.close()
        await asyncio.to_thread(self.kill, timeout)

    def kill(self, timeout: float = 0.0, *, close_socket: bool = False) -> None:
        """Close the socket (the engine exits when it sees that), wait up to `timeout` s, then kill it.
        The socket is closed here if no transport owns it, or with close_socket (no event loop runs any more)."""
        self.closing = True
        _LIVE.discard(self)
        if self.transport is None or close_socket:
            self.sock.close()
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5.0)
