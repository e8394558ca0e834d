"""AsyncLLM: the engine behind an asyncio server — requests are added and streamed concurrently while the model
steps in one background task, so no request blocks another.

    engine = AsyncLLM(LLM("ckpt/"), max_waiting_requests=256)
    await engine.start()
    out = await engine.generate("1+1=", SamplingParams(max_tokens=8))          # -> RequestOutput
    async for events in engine.stream("1+1=", SamplingParams(max_tokens=8)):   # lists of StreamEvent
        ...

How: `add_request` validates at once (TypeError / RequestError / QueueFullError for the caller to report) and
queues the request; the loop task applies queued adds and aborts between steps, runs the model half of a step
(LLM.compute_step: schedule, forward, sample) in a worker thread so the event loop keeps serving, then the
bookkeeping half (LLM.process_step: detokenize, stops) on the loop, and hands each request its events through
its own asyncio.Queue. Engine state is only mutated by the loop task (adds and aborts wait for the step's end),
and the tokenizer is only used on the event loop, never concurrently. A consumer that stops listening (a client
that disconnects) aborts its request, which frees its KV blocks before the next step.
Pure asyncio + torch: the web server (model/serve/) imports this, never the other way round.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .llm_engine import LLM, Request
from .outputs import RequestOutput, StreamEvent
from .sampling_params import SamplingParams

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The bounded waiting queue is full (the server answers HTTP 429)."""


class EngineClosedError(RuntimeError):
    """The engine is shutting down and takes no new requests (the server answers HTTP 503)."""


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


@dataclass
class _Stream:
    queue: asyncio.Queue
    arrival: float
    prompt: str | None
    prompt_ids: list[int]
    first: float | None = None
    num_tokens: int = 0
    done: bool = False
    output: RequestOutput | None = None
    held: list[StreamEvent] = field(default_factory=list)   # events not yet handed over (stream_interval)


class AsyncLLM:
    def __init__(self, llm: LLM, *, max_waiting_requests: int = 256, step_in_thread: bool = True,
                 stream_interval: int = 1):
        """max_waiting_requests: the bound of the waiting queue (beyond it add_request raises QueueFullError).
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
        self.closing = False

    # ---- life cycle --------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the engine loop on the running event loop."""
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="dsmath-engine-loop")

    async def shutdown(self, timeout: float = 0.0) -> None:
        """Take no new requests; let running ones finish for up to `timeout` seconds, abort the rest, stop."""
        self.closing = True
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for rid in list(self._streams):
            self._finish_stream(rid, ("error", "the server is shutting down"))
            self._aborts.add(rid)
        if self._task is not None:
            self._wake.set()
            try:
                await asyncio.wait_for(self._task, timeout=5.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._task.cancel()
            self._task = None

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def num_in_flight(self) -> int:
        """Requests accepted and not finished or aborted."""
        return len(self._streams)

    @property
    def num_waiting(self) -> int:
        """Requests not yet scheduled (queued adds + sequences waiting in the scheduler)."""
        return len(self._pending) + len(self.llm.scheduler.waiting)

    # ---- requests ----------------------------------------------------------------------------------------------
    def add_request(self, prompt, params: SamplingParams | None = None, *, stream_text: bool = True) -> int:
        """Validate and queue one request; returns its id. Raises TypeError / RequestError (bad request),
        QueueFullError (too many waiting) or EngineClosedError (shutting down)."""
        if self.closing or self._task is None:
            raise EngineClosedError("the engine is not running (shutting down or not started)")
        req = self.llm._make_request(prompt, params)
        if self.num_waiting >= self.max_waiting_requests:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting_requests} requests waiting); "
                                 "retry later")
        self._pending.append((req, stream_text))
        st = _Stream(asyncio.Queue(), time.monotonic(), req.prompt, req.prompt_ids)
        self._streams[req.request_id] = self._handles[req.request_id] = st
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
                items = [await st.queue.get()]
                while not st.queue.empty():
                    items.append(st.queue.get_nowait())
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
            self._dispatch(events)
            await asyncio.sleep(0)   # let handlers run between steps

    def _dispatch(self, events: list[StreamEvent]) -> None:
        now, stats, llm = time.monotonic(), self.stats, self.llm
        by_request: dict[int, list[StreamEvent]] = defaultdict(list)
        for ev in events:
            by_request[ev.request_id].append(ev)
        for rid, evs in by_request.items():
            st = self._streams.get(rid)
            if st is None:                       # aborted while its step ran
                llm.finished.pop(rid, None)
                continue
            first = st.first is None
            if first:
                st.first = now
                stats.ttft.observe(now - st.arrival)
                stats.prompt_tokens += len(st.prompt_ids)
            st.num_tokens += len(evs)
            stats.generation_tokens += len(evs)
            out = llm.finished.pop(rid, None)
            st.held += evs
            if first or out is not None or len(st.held) >= self.stream_interval:
                st.queue.put_nowait(("events", st.held))
                st.held = []
            if out is not None:
                for o in out.outputs:
                    stats.finished[o.finish_reason or "none"] += 1
                stats.e2e.observe(now - st.arrival)
                tokens_per_sample = st.num_tokens / max(1, len(out.outputs))
                if tokens_per_sample > 1:
                    stats.tpot.observe((now - st.first) / (tokens_per_sample - 1))
                self._finish_stream(rid, ("done", out))
        running = {s.request_id for s in llm.scheduler.running}
        stats.num_running = len(running)
        stats.num_waiting = len(self._streams) - len(running & self._streams.keys())

    def _finish_stream(self, rid: int, item: tuple[str, object]) -> None:
        st = self._streams.pop(rid, None)
        if st is not None:
            st.done = True
            st.queue.put_nowait(item)
