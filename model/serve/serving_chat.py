"""POST /v1/chat/completions: the conversation is rendered with the tokenizer's chat template (or the server's
--chat-template, or the request's chat_template) and tokenized once (engine/chat.py); n samples; streaming sends
a first chunk with the assistant role per choice, then the content each engine step produced."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from ..engine import RequestOutput
from ..engine.chat import render_chat
from .protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    ChatTopLogprob,
    ChunkEncoder,
    clamp,
    random_id,
    usage,
)
from .serving_engine import SSE_DONE, APIError, LastChunk, OpenAIServing, by_sample, sse


def _top(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": clamp(logprob), "bytes": list(token.encode("utf-8"))}


def chat_logprobs(token_ids: list[int], entries: list[dict], k: int) -> ChatLogprobs:
    """OpenAI's chat layout: per token its own log-prob and the k most likely (by rank)."""
    content = []
    for t, d in zip(token_ids, entries):
        e = d[t]
        tops = sorted((x for x in d.values() if x.rank is not None and x.rank <= k), key=lambda x: x.rank)
        content.append(ChatTokenLogprob(**_top(e.decoded_token or f"token_id:{t}", e.logprob),
                                        top_logprobs=[ChatTopLogprob(**_top(x.decoded_token or "", x.logprob))
                                                      for x in tops]))
    return ChatLogprobs(content=content)


class ServingChat(OpenAIServing):
    async def create(self, req: ChatCompletionRequest, raw_request):
        """A ChatCompletionResponse, an async iterator of SSE strings (stream=True), or None (client gone)."""
        self.check_model(req)
        if req.tools and req.tool_choice != "none":
            raise APIError(400, "tool calling is not supported", param="tools")
        if req.response_format and req.response_format.get("type") not in (None, "text"):
            raise APIError(400, "response_format: only {'type': 'text'} is supported", param="response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs=true", param="top_logprobs")
        try:
            text, ids = render_chat(self.tokenizer, [m.model_dump(exclude_none=True) for m in req.messages],
                                    chat_template=req.chat_template or self.chat_template,
                                    add_generation_prompt=req.add_generation_prompt,
                                    continue_final_message=req.continue_final_message,
                                    chat_template_kwargs=req.chat_template_kwargs)
        except Exception as e:  # noqa: BLE001 - a bad conversation or template is the client's error
            raise APIError(400, f"messages: {e}", param="messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = self.defaults.get("max_tokens")
        k = (req.top_logprobs or 0) if req.logprobs else None
        params = self.params(req.sampling_params, defaults=self.defaults, max_tokens=max_tokens, logprobs=k)
        rids = self.add([{"prompt": text, "prompt_token_ids": ids}], params, stream=req.stream)
        if req.stream:
            return self.stream(req, rids, len(ids), raw_request)
        outs = await self.results(rids, raw_request)
        return None if outs is None else self.response(req, outs[0])

    def response(self, req: ChatCompletionRequest, out: RequestOutput) -> ChatCompletionResponse:
        choices = [ChatChoice(index=c.index, message=ChatMessageOut(content=c.text or ""),
                              logprobs=chat_logprobs(c.token_ids, c.logprobs, req.top_logprobs or 0)
                              if req.logprobs else None,
                              finish_reason=c.finish_reason, stop_reason=c.stop_reason) for c in out.outputs]
        return ChatCompletionResponse(id=random_id("chatcmpl"), model=self.model_name, choices=choices,
                                      usage=usage(len(out.prompt_token_ids),
                                                  sum(len(c.token_ids) for c in out.outputs)))

    async def stream(self, req: ChatCompletionRequest, rids: list[int], prompt_tokens: int,
                     raw_request) -> AsyncIterator[str]:
        rid, created = random_id("chatcmpl"), int(time.time())
        encode = ChunkEncoder("chat.completion.chunk", rid, created, self.model_name)
        yield encode([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                       "finish_reason": None, "stop_reason": None} for i in range(req.n)])
        completion_tokens, last = 0, LastChunk(len(rids) * req.n)
        try:
            async for _, events in self.merged(rids, raw_request):
                completion_tokens += len(events)
                if len(events) == 1 and not req.logprobs:   # the common step: the same chunk, built directly
                    e = events[0]
                    if not last.hold(encode.content_chunk(e.index, e.text or "", e.finish_reason, e.stop_reason),
                                     events):
                        yield last.pop()
                    continue
                choices = []
                for idx, evs in by_sample(events).items():
                    lps = chat_logprobs([e.token_id for e in evs], [e.logprobs for e in evs],
                                        req.top_logprobs or 0).model_dump() if req.logprobs else None
                    text = "".join(e.text or "" for e in evs)
                    choices.append({"index": idx, "delta": {"role": None, "content": text}, "logprobs": lps,
                                    "finish_reason": evs[-1].finish_reason, "stop_reason": evs[-1].stop_reason})
                if not last.hold(encode(choices), events):
                    yield last.pop()
        except APIError as e:
            last.held += sse(e.body())
        tail = last.pop()
        if req.stream_options is not None and req.stream_options.include_usage:
            tail += sse(ChatCompletionChunk(id=rid, created=created, model=self.model_name, choices=[],
                                            usage=usage(prompt_tokens, completion_tokens)))
        yield tail + SSE_DONE
