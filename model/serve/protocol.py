"""The OpenAI API's request and response schemas (the subset dsmath serves) as typed pydantic models, plus the
mapping from a request to SamplingParams.

Requests are validated strictly: "0.5" is not a number and 1.7 is not a token id (HTTP 400, never a silent
coercion). Beside OpenAI's fields, vLLM's extra sampling fields are accepted under the same names (top_k, min_p,
repetition_penalty, min_tokens, stop_token_ids, bad_words, ignore_eos, include_stop_str_in_output,
skip_special_tokens, spaces_between_special_tokens, truncate_prompt_tokens, prompt_logprobs; chat_template,
chat_template_kwargs, add_generation_prompt, continue_final_message for chat). Unknown fields are ignored with a
warning in the server log, as vLLM does.
Defaults: fields a request leaves out take the checkpoint's generation_config.json values (temperature, top_p,
top_k, min_p, repetition_penalty), then SamplingParams' — vLLM's behaviour.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..engine import SamplingParams

LOGPROB_FLOOR = -9999.0   # -inf (a token cut by top-k/top-p in processed mode) is not valid JSON


class OpenAIModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(OpenAIModel):
    """Sampling fields shared by both endpoints (OpenAI's, then vLLM's extras)."""
    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    prompt_logprobs: int | None = None

    def sampling_params(self, defaults: dict, *, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """SamplingParams for this request (raises TypeError/ValueError naming the field: HTTP 400)."""
        def pick(name: str, fallback):
            v = getattr(self, name)
            return v if v is not None else defaults.get(name, fallback)

        bias = None
        if self.logit_bias:
            try:
                bias = {int(k): max(-100.0, min(100.0, v)) for k, v in self.logit_bias.items()}
            except ValueError:
                raise ValueError(f"logit_bias: keys must be token ids, got {list(self.logit_bias)}") from None
        return SamplingParams(
            n=self.n, temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0), top_k=pick("top_k", -1),
            min_p=pick("min_p", 0.0), repetition_penalty=pick("repetition_penalty", 1.0),
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids, bad_words=self.bad_words,
            ignore_eos=self.ignore_eos, max_tokens=max_tokens, min_tokens=self.min_tokens, logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs, include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens, logit_bias=bias,
            truncate_prompt_tokens=self.truncate_prompt_tokens)


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(OpenAIModel):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None                 # deprecated by OpenAI, still sent by many clients
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False


# ---- responses ---------------------------------------------------------------------------------------------------
class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatMessageOut(BaseModel):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "dsmath"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def clamp(lp: float) -> float:
    return max(lp, LOGPROB_FLOOR)


# one encoder for every chunk: json.dumps with non-default arguments builds a new JSONEncoder per call
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_json_str = json.encoder.encode_basestring     # what _dumps does for a str (C-accelerated), minus its dispatch


class ChunkEncoder:
    """The server-sent events of one streamed response, rendered straight to JSON: the same bytes as
    CompletionResponse / ChatCompletionChunk(...).model_dump_json() (tests/test_serve_protocol.py checks), at a
    fraction of the cost — this runs once per stream per engine step."""

    def __init__(self, obj: str, id_: str, created: int, model: str):
        self.head = (f'data: {{"id":{_dumps(id_)},"object":{_dumps(obj)},"created":{int(created)},'
                     f'"model":{_dumps(model)},"choices":[')

    def __call__(self, choices: list[dict]) -> str:
        """choices: dicts with the choice model's fields, in its field order."""
        return self.head + ",".join(_dumps(c) for c in choices) + '],"usage":null}\n\n'

    def text_chunk(self, index: int, text: str, finish_reason: str | None, stop_reason: int | str | None) -> str:
        """One CompletionChoice without log-probs as a chunk: the bytes of __call__([{"index": index, "text": text,
        "logprobs": None, "finish_reason": ..., "stop_reason": ...}]), by string concatenation (the streaming
        hot path: one per request per token)."""
        return self._one_choice(index, f'"text":{_json_str(text)}', finish_reason, stop_reason)

    def content_chunk(self, index: int, content: str, finish_reason: str | None,
                      stop_reason: int | str | None) -> str:
        """text_chunk's counterpart for a ChatStreamChoice: the bytes of __call__([{"index": index, "delta":
        {"role": None, "content": content}, "logprobs": None, "finish_reason": ..., "stop_reason": ...}])."""
        return self._one_choice(index, f'"delta":{{"role":null,"content":{_json_str(content)}}}', finish_reason,
                                stop_reason)

    def _one_choice(self, index: int, body: str, finish_reason: str | None, stop_reason: int | str | None) -> str:
        fr = "null" if finish_reason is None else _dumps(finish_reason)
        sr = "null" if stop_reason is None else _dumps(stop_reason)
        return (f'{self.head}{{"index":{index},{body},"logprobs":null,"finish_reason":{fr},"stop_reason":{sr}}}],'
                '"usage":null}\n\n')
