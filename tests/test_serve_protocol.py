"""The server's protocol layer without a server: the fast stream-chunk encoder writes exactly what the pydantic
response models would, and requests map to SamplingParams with generation_config defaults for omitted fields."""

import json

import pytest

pytest.importorskip("pydantic")

from model.serve.protocol import (  # noqa: E402
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatStreamChoice,
    ChunkEncoder,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
)


def test_chunk_encoder_matches_the_models():
    enc = ChunkEncoder("text_completion", "cmpl-1", 123, "toy \u00e9")
    lp = CompletionLogprobs(text_offset=[0], token_logprobs=[-0.25], tokens=["\u00e9"],
                            top_logprobs=[{"\u00e9": -0.25}])
    choice = dict(index=1, text="a\"b\n\u00e9", logprobs=lp.model_dump(), finish_reason=None, stop_reason="x")
    want = CompletionResponse(id="cmpl-1", created=123, model="toy \u00e9",
                              choices=[CompletionChoice(**{**choice, "logprobs": lp})]).model_dump_json()
    assert enc([choice]) == f"data: {want}\n\n"
    enc = ChunkEncoder("chat.completion.chunk", "c-2", 5, "m")
    choice = dict(index=0, delta={"role": None, "content": "hi"}, logprobs=None, finish_reason="length",
                  stop_reason=None)
    want = ChatCompletionChunk(id="c-2", created=5, model="m", choices=[ChatStreamChoice(
        **{**choice, "delta": DeltaMessage(content="hi")})]).model_dump_json()
    assert enc([choice]) == f"data: {want}\n\n"
    assert json.loads(enc([choice, choice])[6:])["choices"][1]["finish_reason"] == "length"


def test_request_to_sampling_params():
    defaults = {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    req = CompletionRequest.model_validate({"prompt": "x", "top_p": 0.5, "logit_bias": {"7": 200}, "min_tokens": 2})
    p = req.sampling_params(defaults, max_tokens=req.max_tokens, logprobs=None)
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.min_tokens) == (0.6, 0.5, 20, 16, 2)
    assert p.logit_bias == {7: 100.0}                                # clamped to OpenAI's [-100, 100]
    chat = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "temperature": 0})
    assert chat.sampling_params({}, max_tokens=None, logprobs=0).greedy
    with pytest.raises(ValueError, match="logit_bias"):
        CompletionRequest.model_validate({"prompt": "x", "logit_bias": {"a": 1}}).sampling_params(
            {}, max_tokens=1, logprobs=None)
    with pytest.raises(Exception, match="temperature"):              # strict: a string is not a number
        CompletionRequest.model_validate({"prompt": "x", "temperature": "0.5"})
