"""The HTTP app: FastAPI routes wired to the handlers (serving_completion.py, serving_chat.py), the API key check,
OpenAI error bodies for every failure, and uvicorn with graceful shutdown.

    POST /v1/completions   POST /v1/chat/completions   GET /v1/models   GET /health   GET /metrics

Errors: bad JSON or parameters -> 400, wrong or missing API key -> 401, unknown model -> 404, full waiting
queue -> 429, shutting down -> 503, an engine failure -> 500; always {"error": {message, type, param, code}},
never a stack trace. /health and /metrics need no key. SIGTERM: the listening socket closes, new requests on
open connections get 503, running requests finish (up to --shutdown-timeout seconds, then they are aborted),
then the process exits.
"""

from __future__ import annotations

import contextlib
import gc
import hmac
import logging
import signal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ..engine import AsyncLLM
from .metrics import render
from .protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from .serving_chat import ServingChat
from .serving_completion import ServingCompletion
from .serving_engine import APIError

log = logging.getLogger("dsmath.serve")


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


class EventStreamResponse(StreamingResponse):
    """Server-sent events sent straight from the request's task: Starlette's StreamingResponse adds a task group
    and a second receive loop per response to notice a client leaving, which the handlers already do (they
    abort the client's requests, which ends this stream)."""

    async def __call__(self, scope, receive, send) -> None:
        await self.stream_response(send)


def _respond(result) -> Response:
    if result is None:                                     # the client went away; nobody reads this
        return Response(status_code=499)
    if hasattr(result, "model_dump_json"):
        return Response(result.model_dump_json(), media_type="application/json")
    return EventStreamResponse(result, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def build_app(engine: AsyncLLM, *, model_name: str, api_key: str | None = None, chat_template: str | None = None,
              model_path: str | None = None) -> FastAPI:
    completions = ServingCompletion(engine, model_name, chat_template=chat_template)
    chat = ServingChat(engine, model_name, chat_template=chat_template)
    want = f"Bearer {api_key}".encode() if api_key else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        gc.collect()
        gc.freeze()          # start-up objects (model, tokenizer, app) never scanned again: cheaper collections
        yield
        await engine.shutdown(timeout=0.0)   # uvicorn already let running requests finish (bounded)

    app = FastAPI(title="dsmath OpenAI-compatible server", lifespan=lifespan, docs_url=None, redoc_url=None)

    async def check_key(request: Request) -> None:   # async: no thread-pool hop per request
        if want is not None:
            got = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(got, want):             # constant time
                raise APIError(401, "Incorrect or missing API key (Authorization: Bearer KEY)",
                               code="invalid_api_key")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError):
        return _error(APIError(400, _validation_message(exc)))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error(APIError(500, f"internal server error ({type(exc).__name__})"))

    @app.get("/health")
    async def health():
        ok = engine.is_running and not engine.closing
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render(engine, model_name), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        card = ModelCard(id=model_name, root=model_path, max_model_len=engine.llm.max_model_len)
        return Response(ModelList(data=[card]).model_dump_json(), media_type="application/json")

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def create_completion(request: CompletionRequest, raw_request: Request):
        return _respond(await completions.create(request, raw_request))

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request):
        return _respond(await chat.create(request, raw_request))

    return app


def run(app: FastAPI, engine: AsyncLLM, *, host: str, port: int, shutdown_timeout: float = 30.0,
        log_level: str = "info") -> None:
    """Serve until SIGTERM / SIGINT, then shut down gracefully (see the module docstring)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):            # uvicorn's signal handler (main thread)
            engine.closing = True                     # new requests: 503; the loop finishes running ones
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if sig == signal.SIGTERM and captured and captured[-1] == sig:
                captured.pop()                        # a graceful SIGTERM shutdown exits 0, not -15

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5,
                            timeout_graceful_shutdown=shutdown_timeout, access_log=False)
    Server(config).run()
