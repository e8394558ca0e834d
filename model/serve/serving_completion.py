"""POST /v1/completions: one engine request per prompt (a string, token ids, or a list of either), n samples
each; choice index = prompt index * n + sample index. Streaming sends the text (and log-probs) each engine step
produced for each choice as one server-sent event; the concatenated pieces equal the non-streamed text."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

from ..engine import RequestOutput
from .protocol import (
    ChunkEncoder,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    clamp,
    random_id,
    usage,
)
from .serving_engine import SSE_DONE, APIError, LastChunk, OpenAIServing, by_sample, sse


def _token(d: dict, t: int) -> str:
    e = d.get(t) if d else None
    return e.decoded_token if e is not None and e.decoded_token is not None else f"token_id:{t}"


def completion_logprobs(token_ids: list[int], entries: list, offset: int = 0) -> CompletionLogprobs:
    """OpenAI's legacy layout from per-token {id: Logprob} dicts (None entries: the first prompt token)."""
    out = CompletionLogprobs()
    for t, d in zip(token_ids, entries):
        tok = _token(d, t)
        out.tokens.append(tok)
        out.text_offset.append(offset)
        offset += len(tok)
        if d is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(clamp(d[t].logprob))
        out.top_logprobs.append({_token(d, k): clamp(e.logprob) for k, e in d.items()})
    return out


class ServingCompletion(OpenAIServing):
    async def create(self, req: CompletionRequest, raw_request):
        """A CompletionResponse, an async iterator of SSE strings (stream=True), or None (client gone)."""
        self.check_model(req)
        if req.suffix is not None:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of must be None or equal n (no best-of search)", param="best_of")
        if req.echo and req.stream and req.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported when streaming", param="echo")
        prompts = self.prompts(req.prompt)
        params = self.params(req.sampling_params, defaults=self.defaults, max_tokens=req.max_tokens,
                             logprobs=req.logprobs)
        if req.echo and req.logprobs is not None and params.prompt_logprobs is None:
            params = dataclasses.replace(params, prompt_logprobs=req.logprobs)
        rids = self.add(prompts, params, stream=req.stream)
        prompt_info = [self.engine.prompt_of(r) for r in rids]
        if req.stream:
            return self.stream(req, rids, prompt_info, raw_request)
        outs = await self.results(rids, raw_request)
        return None if outs is None else self.response(req, outs)

    @staticmethod
    def prompts(prompt) -> list:
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise APIError(400, "prompt: must not be empty", param="prompt")
        return [prompt] if isinstance(prompt[0], int) else list(prompt)

    def response(self, req: CompletionRequest, outs: list[RequestOutput]) -> CompletionResponse:
        choices, completion_tokens = [], 0
        for i, out in enumerate(outs):
            head = (out.prompt or self.tokenizer.decode(out.prompt_token_ids)) if req.echo else ""
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                lps = None
                if req.logprobs is not None:
                    ids, entries = list(c.token_ids), list(c.logprobs)
                    if req.echo:
                        ids, entries = out.prompt_token_ids + ids, list(out.prompt_logprobs) + entries
                    lps = completion_logprobs(ids, entries)
                choices.append(CompletionChoice(index=i * req.n + c.index, text=head + (c.text or ""), logprobs=lps,
                                                finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
        return CompletionResponse(id=random_id("cmpl"), model=self.model_name, choices=choices,
                                  usage=usage(prompt_tokens, completion_tokens))

    async def stream(self, req: CompletionRequest, rids: list[int], prompt_info: list,
                     raw_request) -> AsyncIterator[str]:
        rid, created = random_id("cmpl"), int(time.time())
        encode = ChunkEncoder("text_completion", rid, created, self.model_name)
        completion_tokens, echoed, last = 0, set(), LastChunk(len(rids) * req.n)
        try:
            async for i, events in self.merged(rids, raw_request):
                completion_tokens += len(events)
                if len(events) == 1 and req.logprobs is None and (not req.echo or (i, events[0].index) in echoed):
                    # the common step (one token of one sample, no log-probs): the same chunk without the
                    # grouping and the choice dict
                    ev = events[0]
                    chunk = encode.text_chunk(i * req.n + ev.index, ev.text or "", ev.finish_reason, ev.stop_reason)
                    if not last.hold(chunk, events):
                        yield last.pop()
                    continue
                choices = []
                for idx, evs in by_sample(events).items():
                    text = "".join(ev.text or "" for ev in evs)
                    if req.echo and (i, idx) not in echoed:
                        echoed.add((i, idx))
                        text = (prompt_info[i][0] or self.tokenizer.decode(prompt_info[i][1])) + text
                    lps = None
                    if req.logprobs is not None:
                        lps = completion_logprobs([ev.token_id for ev in evs], [ev.logprobs for ev in evs]
                                                  ).model_dump()
                    end = evs[-1]
                    choices.append({"index": i * req.n + idx, "text": text, "logprobs": lps,
                                    "finish_reason": end.finish_reason, "stop_reason": end.stop_reason})
                if not last.hold(encode(choices), events):
                    yield last.pop()
        except APIError as e:
            last.held += sse(e.body())
        tail = last.pop()
        if req.stream_options is not None and req.stream_options.include_usage:
            prompt_tokens = sum(len(ids) for _, ids in prompt_info)
            tail += sse(CompletionResponse(id=rid, created=created, model=self.model_name, choices=[],
                                           usage=usage(prompt_tokens, completion_tokens)))
        yield tail + SSE_DONE
