"""AsyncLLM: the engine behind an asyncio server — requests are added and streamed concurrently while the model
steps, so no request blocks another. Two modes, one API (add_request / stream / generate / abort / shutdown):

    engine = AsyncLLM(LLM("ckpt/"), max_waiting_requests=256)                  # the model steps in this process
    engine = AsyncLLM.with_engine_process(functools.partial(LLM, "ckpt/"))     # ... in its own process
    await engine.start()
    out = await engine.generate("1+1=", SamplingParams(max_tokens=8))          # -> RequestOutput
    async for events in engine.stream("1+1=", SamplingParams(max_tokens=8)):   # lists of StreamEvent
        ...

In process: `add_request` validates at once (TypeError / RequestError / QueueFullError for the caller to report)
and queues the request; the loop task applies queued adds and aborts between steps, runs the model half of a step
(LLM.compute_step: schedule, forward, sample) — in a worker thread with step_in_thread, so the event loop keeps
serving while a GPU works — then the bookkeeping half (LLM.process_step: detokenize, stops) on the loop, and
hands each request its events through its own inbox (_Inbox). Engine state is only mutated by the loop task (adds
and aborts wait for the step's end), and the tokenizer is only used on the event loop, never concurrently.
With an engine process (engine_core.py, vLLM V1's EngineCore split): the LLM lives in a child process that only
steps; this process validates and tokenizes (the same LLM code, on an EngineView), sends adds and aborts
batched per event-loop turn, receives one message per step and detokenizes streamed text. The HTTP work then
runs beside the step on another core instead of taking turns with it under one GIL: the server's default
wherever there are >= 2 CPUs or a GPU (model/serve/cli.py says why); in-process stays for tests, for one-core
machines and for users who already hold an LLM object (e.g. a trainer's live model, which cannot move).
Either way, a consumer that stops listening (a client that disconnects) aborts its request, which frees its KV
blocks before the next step; an engine process that dies fails the requests in flight (RuntimeError to their
consumers) and later add_request calls raise EngineDeadError (an EngineClosedError; is_running is False).
Pure asyncio + torch: the web server (model/serve/) imports this, never the other way round.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .detokenizer import decode_step
from .engine_core import EngineCoreClient
from .llm_engine import LLM, Request
from .outputs import RequestOutput, StreamEvent
from .sampling_params import SamplingParams
from .sequence import Sequence

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The bounded waiting queue is full (the server answers HTTP 429)."""


class EngineClosedError(RuntimeError):
    """The engine is shutting down, not started, or its process died, and takes no new requests (HTTP 503)."""


class EngineDeadError(EngineClosedError):
    """The engine process died: nothing in flight finishes, nothing new is taken (restart the server)."""


class Histogram:
    """Cumulative Prometheus-style histogram: counts per upper bound, plus sum and count."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1


LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)


@dataclass
class ServingStats:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=lambda: defaultdict(int))   # finish reason -> requests
    aborted: int = 0
    num_running: int = 0
    num_waiting: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))   # arrival -> first token (s)
    tpot: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))   # per output token after it
    e2e: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))    # arrival -> finished


class _Inbox:
    """A request's items from the engine side to its one consumer: what asyncio.Queue does here (put_nowait, wait
    for items) without its per-item bookkeeping; `take()` returns everything that arrived since the last call
    (this runs once per request per step)."""
    __slots__ = ("items", "waiter")

    def __init__(self):
        self.items: list[tuple[str, object]] = []
        self.waiter: asyncio.Future | None = None

    def put_nowait(self, item: tuple[str, object]) -> None:
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take(self) -> list[tuple[str, object]]:
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        items, self.items = self.items, []
        return items


@dataclass
class _Stream:
    queue: _Inbox
    arrival: float
    prompt: str | None
    prompt_ids: list[int]
    first: float | None = None
    num_tokens: int = 0
    done: bool = False
    output: RequestOutput | None = None
    held: list[StreamEvent] = field(default_factory=list)   # events not yet handed over (stream_interval)
    params: SamplingParams | None = None
    stream_text: bool = False
    samples: dict[int, Sequence] = field(default_factory=dict)   # engine process: detokenizer state per sample


class AsyncLLM:
    def __init__(self, llm: LLM, *, max_waiting_requests: int = 256, step_in_thread: bool = True,
                 stream_interval: int = 1):
        """The model steps in this process (see with_engine_process for the other mode).
        max_waiting_requests: the bound of the waiting queue (beyond it add_request raises QueueFullError).
        step_in_thread: run LLM.compute_step in a worker thread (the event loop serves while the GPU works).
        stream_interval: hand a request's events to its consumer every this many tokens (the first token and the
        last are never held back); larger values mean fewer wake-ups and writes per token, coarser streaming."""
        if max_waiting_requests < 0:
            raise ValueError(f"max_waiting_requests: must be >= 0, got {max_waiting_requests}")
        if stream_interval < 1:
            raise ValueError(f"stream_interval: must be >= 1, got {stream_interval}")
        self.llm = llm
        self.max_waiting_requests = max_waiting_requests
        self.step_in_thread = step_in_thread
        self.stream_interval = stream_interval
        self.stats = ServingStats()
        self._pending: list[tuple[Request, bool]] = []
        self._aborts: set[int] = set()
        self._streams: dict[int, _Stream] = {}    # live requests (until finished or aborted)
        self._handles: dict[int, _Stream] = {}    # added requests whose consumer has not attached yet
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._core: EngineCoreClient | None = None
        self._core_stats = (0, 0)                 # engine process: (running requests, free KV blocks)
        self.closing = False

    @classmethod
    def with_engine_process(cls, build_llm, *, torch_threads: int | None = None, start_method: str | None = None,
                            startup_timeout: float = 900.0, max_waiting_requests: int = 256,
                            stream_interval: int = 1, engine_cpus: frozenset[int] | None = None) -> AsyncLLM:
        """An AsyncLLM whose LLM is built and stepped in a child process (engine_core.py). `build_llm`: a
        picklable callable returning the LLM, e.g. functools.partial(LLM, "ckpt/", dtype=torch.bfloat16).
        Blocks until the engine process has built it (raises its error if it could not); then `await start()`.
        torch_threads: torch.set_num_threads in the engine process. start_method: multiprocessing's (default:
        engine_core.default_start_method). engine_cpus: pin the engine process to these CPUs (engine_core.split_cpus
        picks them for `dsmath serve`). `self.llm` is then an EngineView (tokenizer, config, limits)."""
        core = EngineCoreClient(build_llm, torch_threads=torch_threads, start_method=start_method,
                                startup_timeout=startup_timeout, cpus=engine_cpus)
        try:
            engine = cls(core.view, max_waiting_requests=max_waiting_requests, stream_interval=stream_interval)
        except BaseException:
            core.kill()
            raise
        engine._core = core
        engine._core_stats = (0, core.view.block_manager.num_blocks)
        return engine

    @property
    def engine_pid(self) -> int | None:
        """The engine process's id (None in process)."""
        return self._core.proc.pid if self._core is not None else None

    # ---- life cycle --------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the engine loop on the running event loop (engine process: connect to it)."""
        if self._core is not None:
            if self._core.transport is None:
                await self._core.connect(self._on_core_message, self._on_core_lost)
            if self._core.dead:
                raise EngineDeadError(self._core.dead)
            return
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="dsmath-engine-loop")

    async def shutdown(self, timeout: float = 0.0) -> None:
        """Take no new requests; let running ones finish for up to `timeout` seconds, abort the rest, stop."""
        self.closing = True
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline and self.is_running:
            await asyncio.sleep(0.01)
        for rid in list(self._streams):
            self._finish_stream(rid, ("error", "the server is shutting down"))
            self._aborts.add(rid)
        if self._core is not None:
            await self._core.close()
        if self._task is not None:
            self._wake.set()
            try:
                await asyncio.wait_for(self._task, timeout=5.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._task.cancel()
            self._task = None

    @property
    def is_running(self) -> bool:
        if self._core is not None:
            return self._core.connected
        return self._task is not None and not self._task.done()

    @property
    def dead(self) -> str | None:
        """Why the engine process died (None while it lives, and in process)."""
        return self._core.dead if self._core is not None else None

    @property
    def num_in_flight(self) -> int:
        """Requests accepted and not finished or aborted."""
        return len(self._streams)

    @property
    def num_waiting(self) -> int:
        """Requests not yet scheduled (queued adds + sequences waiting in the scheduler; engine process: requests
        in flight without a running sequence at the last step)."""
        if self._core is not None:
            return max(0, len(self._streams) - self._core_stats[0])
        return len(self._pending) + len(self.llm.scheduler.waiting)

    def kv_cache_blocks(self) -> tuple[int, int]:
        """(KV-cache blocks in use, blocks in all); engine process: as of its last message."""
        if self._core is not None:
            total = self.llm.block_manager.num_blocks
            return total - self._core_stats[1], total
        bm = self.llm.block_manager
        return bm.num_blocks - bm.num_free, bm.num_blocks

    # ---- requests ----------------------------------------------------------------------------------------------
    def add_request(self, prompt, params: SamplingParams | None = None, *, stream_text: bool = True) -> int:
        """Validate and queue one request; returns its id. Raises TypeError / RequestError (bad request),
        QueueFullError (too many waiting) or EngineClosedError (shutting down)."""
        if self.dead:
            raise EngineDeadError(self.dead)
        if self.closing or not self.is_running:
            raise EngineClosedError("the engine is not running (shutting down or not started)")
        req = self.llm._make_request(prompt, params)
        if self.num_waiting >= self.max_waiting_requests:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting_requests} requests waiting); "
                                 "retry later")
        st = _Stream(_Inbox(), time.monotonic(), req.prompt, req.prompt_ids, params=req.params,
                     stream_text=stream_text)
        self._streams[req.request_id] = self._handles[req.request_id] = st
        if self._core is not None:
            self._core.send("add", req)
        else:
            self._pending.append((req, stream_text))
            self._wake.set()
        return req.request_id

    def abort(self, request_id: int) -> None:
        """Drop a request; its blocks are freed before the next step. Unknown or finished ids are ignored."""
        self._handles.pop(request_id, None)
        st = self._streams.pop(request_id, None)
        if st is not None and not st.done:
            st.done = True
            st.queue.put_nowait(("aborted", None))   # wakes a consumer still waiting
            self.stats.aborted += 1
            if self._core is not None:
                if self._core.connected:
                    self._core.send("abort", request_id)
                return
            self._pending = [(r, t) for r, t in self._pending if r.request_id != request_id]
            self._aborts.add(request_id)
            self._wake.set()

    async def events(self, request_id: int) -> AsyncIterator[list[StreamEvent]]:
        """The request's events, a list per wake-up (all that arrived since the last one); ends when it finishes
        or is aborted. Stopping early (or being cancelled) aborts the request. Raises RuntimeError if the engine
        failed it."""
        st = self._handles.pop(request_id)
        try:
            while True:
                items = await st.queue.take()
                if len(items) == 1 and items[0][0] == "events":     # the common wake-up: one step's events
                    yield items[0][1]
                    continue
                events = [ev for kind, x in items if kind == "events" for ev in x]
                if events:
                    yield events
                for kind, x in items:
                    if kind == "error":
                        raise RuntimeError(x)
                    if kind == "done":
                        st.output = x
                    if kind in ("done", "aborted"):
                        return
        finally:
            if st.output is None:
                self.abort(request_id)

    async def result(self, request_id: int) -> RequestOutput | None:
        """Wait for the request's RequestOutput (None if it was aborted; cancelling the wait aborts it)."""
        st = self._handles[request_id]
        async for _ in self.events(request_id):
            pass
        return st.output

    async def generate(self, prompt, params: SamplingParams | None = None) -> RequestOutput:
        return await self.result(self.add_request(prompt, params, stream_text=False))

    async def stream(self, prompt, params: SamplingParams | None = None) -> AsyncIterator[list[StreamEvent]]:
        async for events in self.events(self.add_request(prompt, params)):
            yield events

    def prompt_of(self, request_id: int) -> tuple[str | None, list[int]]:
        """(prompt text or None, prompt token ids) of a request added and not yet attached to a consumer."""
        st = self._handles[request_id]
        return st.prompt, st.prompt_ids

    # ---- the loop ----------------------------------------------------------------------------------------------
    def _apply_control(self) -> None:
        """Queued aborts and adds, applied between steps (the only place engine state changes besides steps)."""
        llm = self.llm
        for rid in self._aborts:
            llm.abort(rid)
            llm.finished.pop(rid, None)
        pending, self._pending = self._pending, []
        for req, stream_text in pending:
            if req.request_id not in self._aborts:
                llm._enqueue(req, stream_text)
        self._aborts.clear()

    async def _run(self) -> None:
        llm = self.llm
        while True:
            self._apply_control()
            if not llm.has_unfinished():
                self.stats.num_running = self.stats.num_waiting = 0
                if self.closing and not self._pending:
                    return
                self._wake.clear()
                if not (self._pending or self._aborts or self.closing):
                    await self._wake.wait()
                continue
            try:
                work = await asyncio.to_thread(llm.compute_step) if self.step_in_thread else llm.compute_step()
                events = llm.process_step(work)
            except Exception as e:  # noqa: BLE001 - one bad step must not kill the server: fail what was running
                log.exception("engine step failed; aborting the requests in flight")
                for rid in list(self._streams):
                    self._finish_stream(rid, ("error", f"engine step failed: {type(e).__name__}: {e}"))
                    llm.abort(rid)
                continue
            self._dispatch(events, llm.finished)
            running = {s.request_id for s in llm.scheduler.running}
            self.stats.num_running = len(running)
            self.stats.num_waiting = len(self._streams) - len(running & self._streams.keys())
            await asyncio.sleep(0)   # let handlers run between steps

    def _dispatch(self, events: list[StreamEvent], finished: dict[int, RequestOutput]) -> None:
        """Hand a step's events to their requests' consumers; `finished`: RequestOutputs of requests that
        finished in the step (popped from it)."""
        now, stats = time.monotonic(), self.stats
        by_request: dict[int, list[StreamEvent]] = defaultdict(list)
        for ev in events:
            by_request[ev.request_id].append(ev)
        for rid, evs in by_request.items():
            st = self._streams.get(rid)
            if st is None:                       # aborted while its step ran
                finished.pop(rid, None)
                continue
            first = st.first is None
            if first:
                st.first = now
                stats.ttft.observe(now - st.arrival)
                stats.prompt_tokens += len(st.prompt_ids)
            st.num_tokens += len(evs)
            stats.generation_tokens += len(evs)
            out = finished.pop(rid, None)
            if st.held:
                evs = st.held + evs
            if first or out is not None or len(evs) >= self.stream_interval:
                st.queue.put_nowait(("events", evs))
                st.held = []
            else:
                st.held = evs
            if out is not None:
                for o in out.outputs:
                    stats.finished[o.finish_reason or "none"] += 1
                stats.e2e.observe(now - st.arrival)
                tokens_per_sample = st.num_tokens / max(1, len(out.outputs))
                if tokens_per_sample > 1:
                    stats.tpot.observe((now - st.first) / (tokens_per_sample - 1))
                self._finish_stream(rid, ("done", out))

    def _finish_stream(self, rid: int, item: tuple[str, object]) -> None:
        st = self._streams.pop(rid, None)
        if st is not None:
            st.done = True
            st.queue.put_nowait(item)

    # ---- the engine process's messages (engine_core.py) --------------------------------------------------------
    def _on_core_message(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "step":
            _, rows, finished, self._core_stats = msg
            self._dispatch([self._event(*row) for row in rows], finished)
        elif kind == "stats":
            self._core_stats = msg[1]
        elif kind == "failed":
            _, rids, message, self._core_stats = msg
            for rid in rids:
                self._finish_stream(rid, ("error", message))
        self.stats.num_running = min(self._core_stats[0], len(self._streams))
        self.stats.num_waiting = self.num_waiting

    def _event(self, rid: int, index: int, token: int, logprob, text, reason, logprobs, stop_reason) -> StreamEvent:
        """A StreamEvent from the engine process's row, with its streamed text: the engine detokenizes requests
        with stop strings (it must, to stop them) and otherwise sends "" until the final event, which holds the
        whole final text; here the same incremental detokenizer turns tokens into streamed pieces."""
        st = self._streams.get(rid)
        if st is not None and st.stream_text and text is not None and not st.params.stop_list:
            seq = st.samples.get(index)
            if seq is None:
                seq = st.samples[index] = Sequence(rid, st.prompt_ids, st.params, index)
            seq.append(token)
            decode_step(self.llm.tokenizer, seq)
            if reason is not None:
                seq.final_text = text
            text = LLM._emit_text(seq, reason is not None)
        return StreamEvent(rid, index, token, logprob, text, reason, logprobs, stop_reason)

    def _on_core_lost(self, reason: str) -> None:
        for rid in list(self._streams):
            self._finish_stream(rid, ("error", reason))
