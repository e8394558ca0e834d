"""What both endpoint handlers share: OpenAI error bodies, adding requests to the AsyncLLM (bad request -> 400,
full queue -> 429, shutting down -> 503), watching for a client that disconnects (its requests are aborted,
which frees their KV blocks), merging the event streams of several requests, and server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

from ..engine import AsyncLLM, EngineClosedError, QueueFullError, RequestOutput, SamplingParams, StreamEvent
from ..engine.async_llm import EngineDeadError
from .protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("dsmath.serve")

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               413: "invalid_request_error",
               429: "rate_limit_exceeded", 500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error the client gets as an OpenAI error body with this HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: int | str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = status if code is None else code

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=ERROR_TYPES.get(self.status, "error"),
                                             param=self.param, code=self.code)).model_dump()


def sse(payload) -> str:
    """One server-sent event holding a pydantic model or a dict as JSON."""
    data = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class LastChunk:
    """Holds back a stream's final token chunk so that it leaves with the usage event and [DONE] in one write:
    the same events, one socket write and one client wake-up instead of three (per request, on the path from
    one request's end to the client's next request). `hold(chunk, events)`: keep `chunk` when `events` finish
    the stream's last sample (True), else hand it on (False, then `pop()` it)."""

    def __init__(self, samples: int):
        self.left, self.held = samples, ""

    def hold(self, chunk: str, events: list[StreamEvent]) -> bool:
        self.held += chunk
        for ev in events:
            if ev.finish_reason is not None:
                self.left -= 1
        return self.left <= 0

    def pop(self) -> str:
        out, self.held = self.held, ""
        return out


def by_sample(events: list[StreamEvent]) -> dict[int, list[StreamEvent]]:
    """A step's events grouped by sample index (in order)."""
    out: dict[int, list[StreamEvent]] = {}
    for ev in events:
        out.setdefault(ev.index, []).append(ev)
    return out


async def wait_disconnect(raw_request) -> None:
    """Returns when the client has gone (ASGI http.disconnect)."""
    while True:
        message = await raw_request.receive()
        if message["type"] == "http.disconnect":
            return


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, model_name: str, *, chat_template: str | None = None):
        self.engine = engine
        self.model_name = model_name
        self.chat_template = chat_template
        self.max_model_len = engine.llm.max_model_len
        self.defaults = engine.llm.generation_defaults
        self.tokenizer = engine.llm.tokenizer

    def check_model(self, request) -> None:
        if request.model is not None and request.model != self.model_name:
            raise APIError(404, f"The model `{request.model}` does not exist (this server has `{self.model_name}`)",
                           param="model", code="model_not_found")
        if request.model_extra:
            log.warning("ignoring unknown request fields: %s", sorted(request.model_extra))

    @staticmethod
    def params(build, **kwargs) -> SamplingParams:
        """SamplingParams from a request; argument errors become HTTP 400 naming the field."""
        try:
            return build(**kwargs)
        except (TypeError, ValueError) as e:
            raise APIError(400, str(e).replace("SamplingParams.", "")) from None

    def add(self, prompts: list, params: SamplingParams, *, stream: bool) -> list[int]:
        """Queue one request per prompt; all or none (a failure aborts the ones already queued)."""
        rids: list[int] = []
        try:
            for prompt in prompts:
                rids.append(self.engine.add_request(prompt, params, stream_text=stream))
        except Exception as e:
            for rid in rids:
                self.engine.abort(rid)
            if isinstance(e, QueueFullError):
                raise APIError(429, str(e)) from None
            if isinstance(e, EngineDeadError):
                raise APIError(503, str(e)) from None
            if isinstance(e, EngineClosedError):
                raise APIError(503, "the server is shutting down") from None
            if isinstance(e, (TypeError, ValueError)):
                raise APIError(400, str(e)) from None
            raise
        return rids

    async def results(self, rids: list[int], raw_request) -> list[RequestOutput] | None:
        """Wait for every request; None when the client disconnected first (its requests are aborted)."""
        gathered = asyncio.ensure_future(asyncio.gather(*(self.engine.result(r) for r in rids)))
        watcher = asyncio.ensure_future(wait_disconnect(raw_request))
        try:
            await asyncio.wait({gathered, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not gathered.done():
                gathered.cancel()                     # cancelling the waits aborts the requests
                with contextlib.suppress(asyncio.CancelledError):
                    await gathered
        try:
            outs = gathered.result()
        except asyncio.CancelledError:               # the client went away first
            return None
        except RuntimeError as e:                    # the engine failed these requests
            raise APIError(500, str(e)) from None
        return None if any(o is None for o in outs) else outs

    async def merged(self, rids: list[int], raw_request) -> AsyncIterator[tuple[int, list[StreamEvent]]]:
        """(prompt index, events) from every request as they come; the requests are aborted if the client
        disconnects or the consumer stops early."""
        watcher = asyncio.ensure_future(wait_disconnect(raw_request))
        watcher.add_done_callback(lambda _: [self.engine.abort(r) for r in rids])
        try:
            if len(rids) == 1:                       # the common case: no pump task, no second queue
                async for events in self.engine.events(rids[0]):
                    yield 0, events
                return
            async for item in self._merged(rids):
                yield item
        except RuntimeError as e:                    # the engine failed the request
            raise APIError(500, str(e)) from None
        finally:
            watcher.cancel()
            for rid in rids:
                self.engine.abort(rid)

    async def _merged(self, rids: list[int]) -> AsyncIterator[tuple[int, list[StreamEvent]]]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, rid: int):
            try:
                async for events in self.engine.events(rid):
                    queue.put_nowait((i, events))
            except RuntimeError as e:
                queue.put_nowait((i, e))
            finally:
                queue.put_nowait((i, None))

        tasks = [asyncio.ensure_future(pump(i, rid)) for i, rid in enumerate(rids)]
        try:
            live = len(rids)
            while live:
                i, item = await queue.get()
                if item is None:
                    live -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
