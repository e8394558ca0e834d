"""The OpenAI-compatible server against the real thing (issue 15): `dsmath serve` in a subprocess on a free loopback
port, on a tiny checkpoint with a tokenizer (train.toy.save_toy_checkpoint), driven by the official `openai` client
(and raw httpx where a client would hide the behaviour): chat and completions, streamed and not, n = 2, logprobs,
stop strings, a disconnect mid-stream (blocks freed), 64 concurrent streams (each streamed text equals the
non-streamed text for the same seed), a queue overflow (429), bad requests (400), a wrong API key (401), a
graceful SIGTERM (the engine process exits too), and the engine process's death (500 to the requests in flight,
503 after, /health fails; no hang). Both servers run the engine in its own process (--engine-process yes, the
default on >= 2 CPUs). Skipped only where fastapi / uvicorn / openai / httpx are not installed (CI installs them)."""

import asyncio
import importlib.util
import os
import re
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

for _mod in ("fastapi", "uvicorn", "openai", "httpx"):
    pytest.importorskip(_mod)

import httpx  # noqa: E402
import openai  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "test-key-15"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_serve", os.path.join(ROOT, "bench", "serve.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_serve"] = mod
    spec.loader.exec_module(mod)
    return mod


bench = load_bench()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from train.toy import save_toy_checkpoint

    return save_toy_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "toy"))


def start(checkpoint, tmp_path_factory, *args):
    log = str(tmp_path_factory.mktemp("log") / "server.log")
    return bench.Server(checkpoint, ["--num-blocks", "512", "--block-size", "16", "--engine-process", "yes", *args],
                        log_path=log).__enter__()


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    srv = start(checkpoint, tmp_path_factory, "--api-key", KEY, "--max-num-seqs", "64")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def metrics(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(dsmath_\w+)\{[^}]*\} (\S+)$", text, re.M)}


def wait_idle(server, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        if (m["dsmath_kv_cache_blocks_used"] == 0 and m["dsmath_num_requests_running"] == 0
                and m["dsmath_num_requests_waiting"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def stream_text(chunks) -> tuple[dict[int, str], dict[int, str], object]:
    """(text per choice, finish reason per choice, usage) of a streamed completion or chat completion."""
    texts, reasons, use = {}, {}, None
    for ch in chunks:
        if ch.usage is not None:
            use = ch.usage
        for c in ch.choices:
            piece = c.text if hasattr(c, "text") else (c.delta.content or "")
            texts[c.index] = texts.get(c.index, "") + piece
            if c.finish_reason is not None:
                reasons[c.index] = c.finish_reason
    return texts, reasons, use


def test_health_models_and_metrics(server, client):
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert [m.id for m in client.models.list().data] == ["toy"]
    m = metrics(server)
    assert m["dsmath_kv_cache_blocks_total"] == 512 and "dsmath_time_to_first_token_seconds_count" in m


def test_cpu_engine_process_is_pinned_off_the_front_end(server):
    """--engine-cpus auto with --threads 1 on a CPU device: the engine process on the last CPU, every thread of the
    front end on the others (no pinning when there is only one CPU)."""
    cpus = sorted(os.sched_getaffinity(0))
    engine_pids = bench.child_pids(server.proc.pid)
    assert len(engine_pids) == 1
    front = {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir(f"/proc/{server.proc.pid}/task")}
    if len(cpus) == 1:
        assert os.sched_getaffinity(engine_pids[0]) == set(cpus) and front == {frozenset(cpus)}
    else:
        assert os.sched_getaffinity(engine_pids[0]) == {cpus[-1]} and front == {frozenset(cpus[:-1])}
        assert server.engine_cpus() == {cpus[-1]}


def test_completions_streamed_equals_non_streamed(server, client):
    kw = dict(model="toy", prompt="3+4=", max_tokens=12, temperature=1.0, seed=7, n=2, logprobs=2)
    full = client.completions.create(**kw)
    assert len(full.choices) == 2 and full.choices[0].text != full.choices[1].text
    assert full.usage.prompt_tokens == 4 and full.usage.completion_tokens == 24
    for c in full.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == 12 and "".join(lp.tokens) == c.text
        assert all(len(t) <= 3 for t in lp.top_logprobs) and all(x <= 0 for x in lp.token_logprobs)
    texts, reasons, use = stream_text(client.completions.create(**kw, stream=True,
                                                                stream_options={"include_usage": True}))
    assert texts == {c.index: c.text for c in full.choices}
    assert reasons == {0: "length", 1: "length"} and use.completion_tokens == 24


def test_several_prompts_streamed_end_once_with_usage(server):
    """Two prompts x n = 2, streamed: four choices, each ends once; the usage event and [DONE] come after the last
    token chunk (they leave in one write with it) and nothing follows [DONE]."""
    body = {"model": "toy", "prompt": ["1+1=", "2+2="], "max_tokens": 6, "temperature": 1.0, "seed": 5, "n": 2,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    import json
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 24
    ends = [c["index"] for ch in chunks[:-1] for c in ch["choices"] if c["finish_reason"] is not None]
    assert sorted(ends) == [0, 1, 2, 3]
    texts = {}
    for ch in chunks[:-1]:
        for c in ch["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    whole = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False}, timeout=60,
                       headers={"Authorization": f"Bearer {KEY}"}).json()
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}


def test_chat_streamed_equals_non_streamed(server, client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    kw = dict(model="toy", messages=msgs, max_completion_tokens=10, temperature=0.8, seed=3, n=2, logprobs=True,
              top_logprobs=3)
    full = client.chat.completions.create(**kw)
    assert [c.message.role for c in full.choices] == ["assistant"] * 2
    assert full.usage.prompt_tokens == len("<system>Be brief.\n<user>What is 2+2?\n<assistant>")
    for c in full.choices:
        toks = c.logprobs.content
        assert len(toks) == 10 and all(len(t.top_logprobs) == 3 for t in toks)
        assert all(t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob for t in toks)
    texts, reasons, use = stream_text(client.chat.completions.create(**kw, stream=True,
                                                                     stream_options={"include_usage": True}))
    assert texts == {c.index: c.message.content for c in full.choices}
    assert set(reasons.values()) == {"length"} and use.completion_tokens == 20


def test_stop_strings(server, client):
    base = client.completions.create(model="toy", prompt="9-5=", max_tokens=16, temperature=0).choices[0].text
    stop = base[5:7]
    cut = base[:base.index(stop)]
    got = client.completions.create(model="toy", prompt="9-5=", max_tokens=16, temperature=0, stop=[stop])
    assert got.choices[0].text == cut and got.choices[0].finish_reason == "stop"
    texts, reasons, _ = stream_text(client.completions.create(model="toy", prompt="9-5=", max_tokens=16,
                                                              temperature=0, stop=stop, stream=True))
    assert texts == {0: cut} and reasons == {0: "stop"}


def test_64_concurrent_streams_lose_and_duplicate_nothing(server):
    """Each of 64 concurrent streams is complete and equals the non-streamed completion with the same seed."""
    async def main():
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)

        async def streamed(i):
            chunks = [ch async for ch in await aclient.completions.create(
                model="toy", prompt=f"{i}+{i % 7}=", max_tokens=12, temperature=1.0, seed=i, stream=True,
                stream_options={"include_usage": True})]
            return stream_text(chunks)

        async def whole(i):
            r = await aclient.completions.create(model="toy", prompt=f"{i}+{i % 7}=", max_tokens=12,
                                                 temperature=1.0, seed=i)
            return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens

        s = await asyncio.gather(*(streamed(i) for i in range(64)))
        w = await asyncio.gather(*(whole(i) for i in range(64)))
        await aclient.close()
        return s, w

    s, w = asyncio.run(main())
    for (texts, reasons, use), (text, reason, ntok) in zip(s, w):
        assert texts == {0: text} and reasons == {0: reason} and use.completion_tokens == ntok
    assert len({t for t, _, _ in w}) > 32                    # different seeds and prompts: different texts
    assert wait_idle(server)["dsmath_kv_cache_blocks_used"] == 0


def test_bench_raw_client_sees_every_event(server):
    """bench/serve.py's light client (it parses the chunked event stream itself) times one event per token and
    reads the usage, over keep-alive connections reused for several requests each."""
    results, _ = asyncio.run(bench.drive(server.url, "toy", bench.make_prompts(6, 8), max_tokens=5, concurrency=2,
                                         api_key=KEY))
    assert len(results) == 6 and all(r["tokens"] == 5 for r in results)
    assert all(r["ttft"] > 0 and r["tpot"] >= 0 and r["latency"] >= r["ttft"] for r in results)


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling policies")
@pytest.mark.parametrize("kind, policy", [("idle", "SCHED_IDLE"), ("batch", "SCHED_BATCH"), ("normal", None)])
def test_bench_client_priority_applies_and_restores(kind, policy):
    """bench/serve.py drives the server at the clients' policy and must give the in-process runs (same process,
    between the server runs) their normal policy back."""
    before = os.sched_getscheduler(0)
    with bench.client_priority(kind) as used:
        assert used == kind
        assert os.sched_getscheduler(0) == (getattr(os, policy) if policy else before)
    assert os.sched_getscheduler(0) == before
    with pytest.raises(ValueError, match="client_priority"):
        with bench.client_priority("lowest"):
            pass


def test_disconnect_frees_blocks(server):
    aborted = metrics(server)["dsmath_requests_aborted_total"]
    body = {"model": "toy", "prompt": "1+1=", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {KEY}"}) as h:
        with h.stream("POST", f"{server.url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert metrics(server)["dsmath_kv_cache_blocks_used"] > 0
        # leaving the block closes the connection mid-stream
    m = wait_idle(server)
    assert m["dsmath_kv_cache_blocks_used"] == 0 and m["dsmath_requests_aborted_total"] == aborted + 1
    with pytest.raises(httpx.ReadTimeout):                   # a non-streaming client that gives up
        httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False}, timeout=1.0,
                   headers={"Authorization": f"Bearer {KEY}"})
    m = wait_idle(server)
    assert m["dsmath_kv_cache_blocks_used"] == 0 and m["dsmath_requests_aborted_total"] == aborted + 2


BAD = [
    ("completions", b"{bad json", "JSON"),
    ("completions", {"prompt": "x", "temperature": "0.5"}, "temperature"),
    ("completions", {"prompt": "x", "temperature": float("nan")}, "temperature"),
    ("completions", {"prompt": [[1.7, 2.2]]}, "prompt"),
    ("completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": "x", "n": 1000}, "max_num_seqs"),
    ("completions", {"prompt": "x" * 2000}, "max_model_len"),
    ("completions", {"prompt": "x", "stop_token_ids": ["a"]}, "stop_token_ids"),
    ("completions", {"prompt": "x", "logprobs": 50}, "max_logprobs"),
    ("completions", {"prompt": "x", "logit_bias": {"a": 1}}, "logit_bias"),
    ("completions", {"prompt": [500]}, "token ids"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("completions", {}, "prompt"),
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tool"),
]


@pytest.mark.parametrize("endpoint,body,match", BAD, ids=[f"{e}-{m}" for e, _, m in BAD])
def test_bad_requests_get_400(server, endpoint, body, match):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    if isinstance(body, dict):
        body = {"model": "toy", **body}
        import json
        body = json.dumps(body).encode()                      # NaN goes out as a bare NaN literal
    r = httpx.post(f"{server.url}/v1/{endpoint}", content=body, headers=headers, timeout=30)
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == 400 and err["type"] == "invalid_request_error", r.text
    assert match.lower() in err["message"].lower(), err["message"]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_openai_client_sees_400_404_and_401(server, client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="toy", prompt="x", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="toy", prompt="x", max_tokens=1)
    assert httpx.post(f"{server.url}/v1/chat/completions", json={}).status_code == 401   # no key at all
    assert httpx.get(f"{server.url}/metrics").status_code == 200                          # open, as /health


def test_engine_process_death_gives_500_then_503_and_fails_health(server):
    """Kill the engine process under a streaming and a non-streaming request: both end with a 500 error (no hang),
    new requests get 503, /health 503 with the reason; the server itself still answers."""
    (core,) = bench.child_pids(server.proc.pid)
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "toy", "prompt": "1+1=", "max_tokens": 900, "ignore_eos": True}
    pool = ThreadPoolExecutor(1)
    with httpx.Client(timeout=30, headers=headers) as h:
        whole = pool.submit(h.post, f"{server.url}/v1/completions", json=body)
        with h.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            deadline = time.monotonic() + 20
            while metrics(server)["dsmath_num_requests_running"] < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            os.kill(core, signal.SIGKILL)
            rest = [ln for ln in lines if ln.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and '"code":500' in rest[-2].replace(" ", "")
        assert "engine process died" in rest[-2]
        r = whole.result(timeout=30)
        assert r.status_code == 500 and "engine process died" in r.json()["error"]["message"]
        r = h.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 2})
        assert r.status_code == 503 and "engine process died" in r.json()["error"]["message"]
    health = httpx.get(f"{server.url}/health", timeout=10)
    assert health.status_code == 503 and "killed by signal 9" in health.json()["reason"]
    assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 200 and server.proc.poll() is None


@pytest.fixture(scope="module")
def small_server(checkpoint, tmp_path_factory):
    """One running sequence and one waiting request at most."""
    srv = start(checkpoint, tmp_path_factory, "--max-num-seqs", "1", "--max-waiting-requests", "1",
                "--shutdown-timeout", "20")
    yield srv
    srv.stop()


def test_queue_overflow_gets_429(small_server):
    srv, body = small_server, {"model": "toy", "prompt": "5+5=", "max_tokens": 900, "ignore_eos": True}
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)
    with httpx.Client(timeout=60) as h, h.stream("POST", f"{srv.url}/v1/completions",
                                                  json={**body, "stream": True}) as running:
        lines = running.iter_lines()                         # (kept: dropping it would close the connection)
        next(lines)                                          # A runs
        with httpx.Client(timeout=60) as h2, h2.stream("POST", f"{srv.url}/v1/completions",
                                                        json={**body, "stream": True}) as waiting:
            deadline = time.monotonic() + 20                 # B waits
            while metrics(srv)["dsmath_num_requests_waiting"] < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert metrics(srv)["dsmath_num_requests_waiting"] == 1 and waiting.status_code == 200
            with pytest.raises(openai.RateLimitError, match="waiting queue is full"):
                client.completions.create(model="toy", prompt="1", max_tokens=1)
    assert wait_idle(srv)["dsmath_kv_cache_blocks_used"] == 0
    assert client.completions.create(model="toy", prompt="1", max_tokens=2).usage.completion_tokens == 2


def test_sigterm_finishes_running_requests_then_exits(small_server):
    srv = small_server
    engines = bench.child_pids(srv.proc.pid)
    assert len(engines) == 1
    with httpx.Client(timeout=60) as h, h.stream("POST", f"{srv.url}/v1/completions", json={
            "model": "toy", "prompt": "2+2=", "max_tokens": 60, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        try:                                                 # no new requests: refused, or 503 while draining
            assert httpx.get(f"{srv.url}/health", timeout=2).status_code == 503
        except httpx.TransportError:
            pass
        rest = [ln for ln in lines if ln.startswith("data: ")]
    assert rest[-1] == "data: [DONE]" and '"completion_tokens":60' in rest[-2]   # the running request finished
    assert srv.proc.wait(timeout=30) == 0
    deadline = time.monotonic() + 10                         # the engine process is gone too (no orphan)
    while os.path.exists(f"/proc/{engines[0]}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{engines[0]}")
