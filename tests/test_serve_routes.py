"""GenerationRoutes (model/serve/api_server.py), the ASGI front of the two generation endpoints, driven with
fake ASGI receive/send (no server, no engine): status codes, OpenAI error bodies, how a stream is written
([DONE] ending the response in the same write), and that an abandoned stream is
closed. The live server's behaviour (same codes through uvicorn, streamed == non-streamed text) is
tests/test_serve.py."""

import asyncio
import json

import pytest

pytest.importorskip("fastapi")

from model.engine.outputs import StreamEvent  # noqa: E402
from model.serve.api_server import GenerationRoutes  # noqa: E402
from model.serve.protocol import CompletionRequest  # noqa: E402
from model.serve.serving_engine import SSE_DONE, APIError, LastChunk  # noqa: E402


class Inner:
    def __init__(self):
        self.calls = []

    async def __call__(self, scope, receive, send):
        self.calls.append(scope["path"])


def run(app, *, path="/v1/completions", method="POST", body=b"{}", headers=(), chunks=None, fail_send=None):
    """Drive one request; returns the sent ASGI messages."""
    parts = list(chunks) if chunks is not None else [body]
    sent = []

    async def receive():
        if parts:
            chunk = parts.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(parts)}
        await asyncio.sleep(3600)

    async def send(message):
        if fail_send is not None and len(sent) >= fail_send:
            raise OSError("client gone")
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": list(headers)}
    asyncio.run(app(scope, receive, send))
    return sent


def status_and_body(sent):
    assert sent[0]["type"] == "http.response.start"
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def routes(create, key=None):
    inner = Inner()
    return GenerationRoutes(inner, {"/v1/completions": (CompletionRequest, create)},
                            f"Bearer {key}".encode() if key else None), inner


async def never(req, raw):
    raise AssertionError("the handler must not run")


def test_other_paths_and_methods_go_to_fastapi():
    app, inner = routes(never)
    run(app, path="/v1/models", method="GET")
    run(app, path="/v1/completions", method="GET")
    assert inner.calls == ["/v1/models", "/v1/completions"]


@pytest.mark.parametrize("body,status,match", [
    (b"{bad json", 400, "json"),
    (b'{"prompt": "x", "temperature": "0.5"}', 400, "temperature"),
    (b'[1, 2]', 400, "body"),
])
def test_bad_bodies_get_openai_400(body, status, match):
    app, _ = routes(never)
    code, out = status_and_body(run(app, body=body))
    err = json.loads(out)["error"]
    assert code == status and err["code"] == status and err["type"] == "invalid_request_error"
    assert match in err["message"].lower()


def test_api_key_is_checked_before_the_body():
    app, _ = routes(never, key="sesame")
    for headers in ([], [(b"authorization", b"Bearer nope")]):
        code, out = status_and_body(run(app, body=b"{bad json", headers=headers))
        assert code == 401 and json.loads(out)["error"]["code"] == "invalid_api_key"


def test_body_over_the_limit_gets_413(monkeypatch):
    app, _ = routes(never)
    monkeypatch.setattr(GenerationRoutes, "MAX_BODY", 10)
    code, out = status_and_body(run(app, chunks=[b'{"prompt": ', b'"xxxxxxxx"}']))
    assert code == 413 and "larger than 10 bytes" in json.loads(out)["error"]["message"]


def test_handler_errors_become_openai_bodies():
    async def bad_request(req, raw):
        raise APIError(429, "the waiting queue is full")

    async def bug(req, raw):
        raise KeyError("x")

    code, out = status_and_body(run(routes(bad_request)[0], body=b'{"prompt": "x"}'))
    assert code == 429 and json.loads(out)["error"]["type"] == "rate_limit_exceeded"
    code, out = status_and_body(run(routes(bug)[0], body=b'{"prompt": "x"}'))
    assert code == 500 and "KeyError" in json.loads(out)["error"]["message"]


def test_stream_done_ends_the_response_in_its_own_write():
    closed = []

    async def create(req, raw):
        assert req.prompt == "x" and callable(raw.receive)

        async def gen():
            try:
                yield "data: 1\n\n"
                yield "data: 2\n\n" + SSE_DONE
            finally:
                closed.append(True)
        return gen()

    sent = run(routes(create)[0], body=b'{"prompt": "x", "stream": true}')
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body", "http.response.body"]
    assert dict(sent[0]["headers"])[b"content-type"].startswith(b"text/event-stream")
    assert sent[1]["more_body"] is True and sent[2]["more_body"] is False      # no extra empty write
    assert sent[2]["body"].endswith(SSE_DONE.encode()) and closed == [True]


def test_a_client_that_leaves_mid_stream_closes_the_generator():
    closed = []

    async def create(req, raw):
        async def gen():
            try:
                while True:
                    yield "data: x\n\n"
                    await asyncio.sleep(0)
            finally:
                closed.append(True)                  # the handlers abort their requests here
        return gen()

    sent = run(routes(create)[0], body=b'{"prompt": "x", "stream": true}', fail_send=3)
    assert len(sent) == 3 and closed == [True]


def ev(rid, index, reason=None):
    return StreamEvent(rid, index, 5, None, "t", reason)


def test_last_chunk_holds_only_the_chunk_that_finishes_every_sample():
    last = LastChunk(samples=2)
    assert not last.hold("a", [ev(0, 0), ev(0, 1)]) and last.pop() == "a"
    assert not last.hold("b", [ev(0, 0, "length"), ev(0, 1)]) and last.pop() == "b"   # one sample left
    assert last.hold("c", [ev(0, 1, "stop")]) and last.pop() == "c" and last.pop() == ""
