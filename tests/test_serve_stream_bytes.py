"""The streamed bytes of /v1/completions and /v1/chat/completions against a plain reference: for scripted engine
events (a fake engine, no model), every server-sent event the handlers yield — token chunks, the usage event,
[DONE], a mid-stream error body — equals what pydantic's model_dump_json / json.dumps build from the same events,
except nothing: the random id and the created time are read from the stream and used in the reference. Guards the
handlers' fast paths (ChunkEncoder.text_chunk, the one-event step) against any drift in the bytes."""

import asyncio
import json
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")

from model.engine.outputs import Logprob, StreamEvent  # noqa: E402
from model.serve.protocol import (  # noqa: E402
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatStreamChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    usage,
)
from model.serve.serving_chat import ServingChat, chat_logprobs  # noqa: E402
from model.serve.serving_completion import ServingCompletion, completion_logprobs  # noqa: E402
from train.toy import char_tokenizer  # noqa: E402

MODEL = "toy-\u00e9"


class ScriptedEngine:
    """What the handlers use of AsyncLLM: requests get ids 0, 1, ...; request r yields script[r] (lists of
    StreamEvent, or an Exception to raise). `order` records (request, events) as they are handed out."""

    def __init__(self, tokenizer, script):
        self.llm = SimpleNamespace(max_model_len=1024, generation_defaults={}, tokenizer=tokenizer)
        self.tokenizer, self.script, self.prompts, self.order = tokenizer, script, [], []

    def add_request(self, prompt, params, *, stream_text=True):
        if isinstance(prompt, dict):
            self.prompts.append((prompt["prompt"], prompt["prompt_token_ids"]))
        else:
            self.prompts.append((prompt, self.tokenizer.encode(prompt)))
        return len(self.prompts) - 1

    def prompt_of(self, rid):
        return self.prompts[rid]

    async def events(self, rid):
        for step in self.script[rid]:
            await asyncio.sleep(0)
            if isinstance(step, Exception):
                raise step
            self.order.append((rid, step))
            yield step

    def abort(self, rid):
        pass


class Forever:
    async def receive(self):
        await asyncio.Event().wait()


def ev(rid, index, text, token=5, finish=None, stop=None, lps=None):
    return StreamEvent(rid, index, token, None, text, finish, lps, stop)


def lp(token, value, *others):
    """{token: Logprob} with the chosen token first, then (token, value) pairs ranked 1, 2, ..."""
    d = {token: Logprob(value, 1, chr(token))}
    for r, (t, v) in enumerate(others):
        d.setdefault(t, Logprob(v, r + 1, chr(t)))
    return d


def run_stream(handler, request_cls, body, script):
    tok = char_tokenizer(chat_template=True)
    engine = ScriptedEngine(tok, script)
    serving = handler(engine, MODEL)
    req = request_cls.model_validate_json(json.dumps(body))

    async def go():
        stream = await serving.create(req, Forever())
        return [chunk async for chunk in stream]

    return asyncio.run(go()), engine, req


def id_created(first: str) -> tuple[str, int]:
    head = json.loads(first.split("\n\n")[0][len("data: "):])
    return head["id"], head["created"]


def sse_model(model) -> str:
    return f"data: {model.model_dump_json()}\n\n"


def groups(events):
    out = {}
    for e in events:
        out.setdefault(e.index, []).append(e)
    return out


def expected_yields(first, chunks, samples, finishing, tail):
    """How the handler hands out its events: each chunk alone, except that the chunk finishing the last sample
    leaves with the usage event and [DONE] (LastChunk)."""
    out, left, held = list(first), samples, ""
    for chunk, fin in zip(chunks, finishing):
        left -= fin
        if left <= 0:
            held += chunk
        else:
            out.append(chunk)
    return out + [held + tail + "data: [DONE]\n\n"]


def reference_completion(engine, req, got, error=None):
    rid, created = id_created(got[0])
    chunks, finishing, echoed, tokens = [], [], set(), 0
    for i, events in engine.order:
        tokens += len(events)
        choices = []
        for idx, evs in groups(events).items():
            text = "".join(e.text or "" for e in evs)
            if req.echo and (i, idx) not in echoed:
                echoed.add((i, idx))
                text = engine.prompts[i][0] + text
            lps = None
            if req.logprobs is not None:
                lps = completion_logprobs([e.token_id for e in evs], [e.logprobs for e in evs])
            choices.append(CompletionChoice(index=i * req.n + idx, text=text, logprobs=lps,
                                            finish_reason=evs[-1].finish_reason, stop_reason=evs[-1].stop_reason))
        chunks.append(sse_model(CompletionResponse(id=rid, created=created, model=MODEL, choices=choices)))
        finishing.append(sum(e.finish_reason is not None for e in events))
    tail = "" if error is None else f"data: {json.dumps(error)}\n\n"
    if req.stream_options is not None and req.stream_options.include_usage:
        prompt_tokens = sum(len(ids) for _, ids in engine.prompts)
        tail += sse_model(CompletionResponse(id=rid, created=created, model=MODEL, choices=[],
                                             usage=usage(prompt_tokens, tokens)))
    return expected_yields([], chunks, len(engine.prompts) * req.n, finishing, tail)


def reference_chat(engine, req, got):
    rid, created = id_created(got[0])
    role = ChatCompletionChunk(id=rid, created=created, model=MODEL, choices=[
        ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content="")) for i in range(req.n)])
    chunks, finishing, tokens = [], [], 0
    for _, events in engine.order:
        tokens += len(events)
        choices = []
        for idx, evs in groups(events).items():
            lps = chat_logprobs([e.token_id for e in evs], [e.logprobs for e in evs],
                                req.top_logprobs or 0) if req.logprobs else None
            choices.append(ChatStreamChoice(index=idx, delta=DeltaMessage(content="".join(e.text for e in evs)),
                                            logprobs=lps, finish_reason=evs[-1].finish_reason,
                                            stop_reason=evs[-1].stop_reason))
        chunks.append(sse_model(ChatCompletionChunk(id=rid, created=created, model=MODEL, choices=choices)))
        finishing.append(sum(e.finish_reason is not None for e in events))
    tail = ""
    if req.stream_options is not None and req.stream_options.include_usage:
        tail = sse_model(ChatCompletionChunk(id=rid, created=created, model=MODEL, choices=[],
                                             usage=usage(len(engine.prompts[0][1]), tokens)))
    return expected_yields([sse_model(role)], chunks, req.n, finishing, tail)


# text pieces that JSON must escape or keep as they are: quotes, backslash, control characters, non-ASCII; a
# multi-byte character split across tokens streams "" then the whole character
TRICKY = ['He said "hi"', "\\n", "\n\t", "\x01", "", "\u00e9", "\u65e5\u672c", "\U0001f600", " ", "</s>"]


def one_sample_script(rid, pieces, finish="length", stop=None, index=0):
    steps = [[ev(rid, index, p, token=40 + k)] for k, p in enumerate(pieces)]
    last = steps[-1][0]
    steps[-1] = [ev(rid, index, last.text, token=last.token_id, finish=finish, stop=stop)]
    return steps


COMPLETION_CASES = {
    "plain_usage": ({"include_usage": True}, {}, [one_sample_script(0, TRICKY)]),
    "no_usage": (None, {}, [one_sample_script(0, ["a", "b"])]),
    "stop_string": ({"include_usage": True}, {"stop": ["###"]},
                    [one_sample_script(0, ["x", "", "y z"], finish="stop", stop="###")]),
    "stop_token": ({"include_usage": True}, {}, [one_sample_script(0, ["x", "y"], finish="stop", stop=7)]),
    "n2_interleaved": ({"include_usage": True}, {"n": 2}, [[
        [ev(0, 0, "a"), ev(0, 1, "\u00e9")],
        [ev(0, 1, "")],
        [ev(0, 0, "b"), ev(0, 0, "c")],
        [ev(0, 0, "d", finish="stop", stop="###")],
        [ev(0, 1, "\u65e5", finish="length")],
    ]]),
    "two_prompts_echo": ({"include_usage": True}, {"echo": True, "prompt": ["ab", "c\"d"]},
                         [one_sample_script(0, ["1", "2", "3"]), one_sample_script(1, ["\u00e9", "4"])]),
    "echo_one": (None, {"echo": True}, [one_sample_script(0, ["1", "2", "3"])]),
    "logprobs": ({"include_usage": True}, {"logprobs": 2}, [[
        [ev(0, 0, "a", token=97, lps=lp(97, -0.25, (98, -1.5)))],
        [ev(0, 0, "b", token=98, lps=lp(98, -0.123456789, (97, -2.0), (99, -9999.0)))],
        [ev(0, 0, "c", token=99, finish="length", lps=lp(99, -0.0625, (97, -3.75)))],
    ]]),
    "n2_two_prompts": (None, {"n": 2, "prompt": ["x", "y"]}, [
        [[ev(0, 0, "a")], [ev(0, 1, "b", finish="length")], [ev(0, 0, "c", finish="stop")]],
        [[ev(1, 1, "d"), ev(1, 0, "e", finish="length")], [ev(1, 1, "f", finish="length")]],
    ]),
    "engine_error": ({"include_usage": True}, {}, [[[ev(0, 0, "a")], RuntimeError("engine step failed: boom")]]),
}


@pytest.mark.parametrize("case", sorted(COMPLETION_CASES))
def test_completion_stream_bytes_match_reference(case):
    stream_options, extra, script = COMPLETION_CASES[case]
    body = {"model": MODEL, "prompt": "pr\u00e9", "max_tokens": 8, "stream": True, **extra}
    if stream_options is not None:
        body["stream_options"] = stream_options
    got, engine, req = run_stream(ServingCompletion, CompletionRequest, body, script)
    error = None
    if case == "engine_error":
        error = {"error": {"message": "engine step failed: boom", "type": "server_error", "param": None,
                           "code": 500}}
    want = reference_completion(engine, req, got, error)
    assert got == want


CHAT_CASES = {
    "plain_usage": ({"include_usage": True}, {}, [one_sample_script(0, TRICKY, finish="stop", stop="###")]),
    "n2": (None, {"n": 2}, [[
        [ev(0, 0, "a"), ev(0, 1, "")],
        [ev(0, 1, "\u00e9")],
        [ev(0, 0, "b", finish="length")],
        [ev(0, 1, "c", finish="stop", stop=7)],
    ]]),
    "logprobs": ({"include_usage": True}, {"logprobs": True, "top_logprobs": 2}, [[
        [ev(0, 0, "a", token=97, lps=lp(97, -0.25, (98, -1.5)))],
        [ev(0, 0, "\u00e9", token=98, finish="length", lps=lp(98, -0.5, (97, -2.0), (99, -7.0)))],
    ]]),
}


@pytest.mark.parametrize("case", sorted(CHAT_CASES))
def test_chat_stream_bytes_match_reference(case):
    stream_options, extra, script = CHAT_CASES[case]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi \u00e9"}], "max_tokens": 8,
            "stream": True, **extra}
    if stream_options is not None:
        body["stream_options"] = stream_options
    got, engine, req = run_stream(ServingChat, ChatCompletionRequest, body, script)
    assert got == reference_chat(engine, req, got)
