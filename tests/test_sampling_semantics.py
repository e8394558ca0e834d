"""vLLM's sampling semantics on the engine (issue 15): logprobs int|None with Logprob dicts and cumulative_logprob,
prompt_logprobs, raw vs processed log-probs, min_p, min_tokens, penalties, bad_words, logit_bias,
include_stop_str_in_output, skip_special_tokens, truncate_prompt_tokens, generation_config.json defaults.
References are full forwards of the mock model (no cache) and plain formulas."""

import json
import math

import pytest
import torch
from tiny_models import word_tokenizer

from model.engine import LLM, Logprob, SamplingParams
from model.engine.logits_processors import RowContext, apply_processors
from model.engine.mock_model import MockPagedModel
from model.engine.sampler import Sampler

V = 64
EOS = V - 1
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return MockPagedModel(vocab_size=V, eos_token_id=None, seed=2)


@pytest.fixture(scope="module")
def llm(model):
    return LLM(model, num_blocks=256, block_size=4, tokenizer=word_tokenizer(V))


def full_logits(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] logits of a full forward (position i predicts token i + 1)."""
    return model(torch.tensor([ids])).logits[0]


def check_free(llm: LLM):
    assert llm.block_manager.check_all_free() and not llm.has_unfinished()


def test_logprobs_none_zero_and_top_k(llm, model):
    prompt = [3, 9, 27, 5]
    none = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0].outputs[0]
    assert none.logprobs is None and none.cumulative_logprob is None and none.token_logprobs is None
    zero, three = (llm.generate([prompt], SamplingParams(temperature=0, max_tokens=5, logprobs=k),
                                use_tqdm=False)[0].outputs[0] for k in (0, 3))
    assert zero.token_ids == three.token_ids == none.token_ids
    ref = full_logits(model, prompt + zero.token_ids)[len(prompt) - 1:-1].log_softmax(-1)   # [5, V]
    for i, (t, d0, d3) in enumerate(zip(zero.token_ids, zero.logprobs, three.logprobs)):
        assert list(d0) == [t] and isinstance(d0[t], Logprob)               # logprobs=0: the chosen token only
        assert d0[t].rank == 1 and d0[t].decoded_token == f"w{t}"           # greedy: the chosen one ranks first
        assert math.isclose(d0[t].logprob, float(ref[i, t]), abs_tol=1e-5)
        top = ref[i].topk(3)
        assert list(d3) == top.indices.tolist()                             # chosen (= top-1) first, then top-3
        assert [e.rank for e in d3.values()] == [1, 2, 3]
        torch.testing.assert_close(torch.tensor([e.logprob for e in d3.values()]), top.values, atol=1e-5, rtol=0)
    assert math.isclose(zero.cumulative_logprob, sum(zero.token_logprobs), rel_tol=1e-9)
    check_free(llm)


def test_raw_and_processed_logprobs(llm, model):
    """Raw (default) = the model's log_softmax; processed = log_softmax(logits / T) over the FULL vocabulary: the
    temperature applies, the top-k cut the token was drawn under does not (what the GRPO loss computes) — as the
    engine's default mode or the request's."""
    prompt = [7, 1, 4]
    base = dict(temperature=0.5, top_k=4, max_tokens=6, seed=3, logprobs=5)
    raw = llm.generate([prompt], SamplingParams(**base), use_tqdm=False)[0].outputs[0]
    proc = llm.generate([prompt], SamplingParams(**base, logprobs_mode="processed_logprobs"),
                        use_tqdm=False)[0].outputs[0]
    assert raw.token_ids == proc.token_ids                                 # the mode never changes sampling
    logits = full_logits(model, prompt + raw.token_ids)[len(prompt) - 1:-1]   # [6, V]
    scaled = (logits / 0.5).log_softmax(-1)
    for i, t in enumerate(raw.token_ids):
        assert int((logits[i] > logits[i, t]).sum()) < 4                  # drawn inside the top-4
        assert math.isclose(raw.logprobs[i][t].logprob, float(logits[i].log_softmax(-1)[t]), abs_tol=1e-5)
        assert math.isclose(proc.logprobs[i][t].logprob, float(scaled[i, t]), abs_tol=1e-5)
        top = scaled[i].topk(5)                                            # the 5th: outside top_k, still finite
        got = sorted(((e.rank, e.logprob) for k, e in proc.logprobs[i].items() if e.rank <= 5))
        torch.testing.assert_close(torch.tensor([v for _, v in got]), top.values, atol=1e-5, rtol=0)
    assert math.isclose(proc.cumulative_logprob, float(scaled.gather(1, torch.tensor(proc.token_ids)[:, None]).sum()),
                        abs_tol=1e-4)
    engine_default = LLM(model, num_blocks=64, block_size=4, logprobs_mode="processed_logprobs")
    same = engine_default.generate([prompt], SamplingParams(**base), use_tqdm=False)[0].outputs[0]
    assert same.token_logprobs == proc.token_logprobs


def test_processed_logprobs_equal_the_trainers_without_truncation(model):
    """With top_p=1, top_k=-1 (GRPO's settings) processed log-probs are log_softmax(logits / T) over the whole
    vocabulary — what the GRPO loss computes for the same tokens."""
    llm = LLM(model, num_blocks=64, block_size=4)
    prompt = [11, 12, 13]
    out = llm.generate([prompt], SamplingParams(n=2, temperature=0.7, max_tokens=8, seed=1, logprobs=0,
                                                logprobs_mode="processed_logprobs"), use_tqdm=False)[0]
    for c in out.outputs:
        logits = full_logits(model, prompt + c.token_ids)[len(prompt) - 1:-1]
        want = (logits / 0.7).log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.token_logprobs), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("budget,prefix_caching", [(64, False), (3, False), (3, True)])
def test_prompt_logprobs(model, budget, prefix_caching):
    """Prompt log-probs: raw, [None, {...}, ...], the prompt token plus the top-k, also across prefill chunks,
    n > 1 and a prefix cache that holds the prompt (prompt_logprobs requests bypass it)."""
    llm = LLM(model, num_blocks=64, block_size=4, max_num_batched_tokens=budget, max_num_seqs=2,
              enable_prefix_caching=prefix_caching)
    prompt = [5, 17, 33, 2, 8, 60, 1, 9, 14]
    if prefix_caching:
        llm.generate([prompt], SamplingParams(max_tokens=2), use_tqdm=False)     # fills the cache
    out = llm.generate([prompt], SamplingParams(n=2, temperature=1.0, max_tokens=3, prompt_logprobs=2, seed=0),
                       use_tqdm=False)[0]
    ref = full_logits(model, prompt).log_softmax(-1)                              # [P, V]
    pl = out.prompt_logprobs
    assert len(pl) == len(prompt) and pl[0] is None
    for p in range(1, len(prompt)):
        t = prompt[p]
        assert next(iter(pl[p])) == t and math.isclose(pl[p][t].logprob, float(ref[p - 1, t]), abs_tol=1e-5)
        assert pl[p][t].rank == int((ref[p - 1] > ref[p - 1, t]).sum()) + 1
        assert set(ref[p - 1].topk(2).indices.tolist()) <= set(pl[p])
    assert all(c.logprobs is None for c in out.outputs)
    check_free(llm)


def test_processors_match_formulas():
    """apply_processors against the formulas: bad words, min_tokens, logit_bias, penalties."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 10, generator=g) * 3
    ps = [SamplingParams(repetition_penalty=1.7), SamplingParams(frequency_penalty=0.5, presence_penalty=-0.3),
          SamplingParams(bad_words=["x"], min_tokens=5, logit_bias={2: 4.5}), SamplingParams()]
    ctx = [RowContext([1, 2], [2, 3, 3]), RowContext([1, 2], [2, 3, 3]),
           RowContext([0], [7, 8], bad_words=[[9], [7, 8, 4], [8, 6], [5, 6]], stop_ids=[0, 1]), None]
    got = apply_processors(logits, ps, ctx)
    want = logits.clone()
    for t in (1, 2, 3):                                       # seen in prompt or output
        x = want[0, t]
        want[0, t] = x / 1.7 if x > 0 else x * 1.7
    want[1, 2] -= 0.5 * 1 - 0.3                              # once in the output
    want[1, 3] -= 0.5 * 2 - 0.3                              # twice
    want[2, [9, 4, 6, 0, 1]] = float("-inf")                 # [5, 6] does not match the tail [7, 8]
    want[2, 2] += 4.5
    torch.testing.assert_close(got, want)
    assert got[3].equal(logits[3]) and apply_processors(logits, [SamplingParams()] * 4, [None] * 4) is logits


def test_min_p_cuts_unlikely_tokens():
    logits = torch.tensor([[3.0, 2.9, 0.0, -1.0, -5.0]]).expand(3000, 5).clone()
    p = SamplingParams(temperature=1.0, min_p=0.2)
    tok = Sampler(seed=0)(logits, [p] * 3000, [None] * 3000).tokens
    probs = logits[0].softmax(-1)
    keep = probs >= 0.2 * probs.max()
    assert set(tok.tolist()) == set(keep.nonzero()[:, 0].tolist())


def test_min_tokens_stop_ids_and_stop_reason(llm, model):
    prompt = [4, 4, 4]
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0]
    stop = free.token_ids[1]
    k = free.token_ids.index(stop)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free.token_ids[:k + 1] and out.finish_reason == "stop" and out.stop_reason == stop
    held = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop], min_tokens=6),
                        use_tqdm=False)[0].outputs[0]
    assert stop not in held.token_ids[:6] and len(held.token_ids) >= 6        # banned until 6 tokens exist
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=3)


def test_logit_bias_bad_words_and_penalties_change_greedy(llm):
    prompt = [10, 20, 30]
    base = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0].outputs[0]
    biased = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, logit_bias={42: 100.0}),
                          use_tqdm=False)[0].outputs[0]
    assert biased.token_ids == [42] * 6
    word = f"w{base.token_ids[0]}"
    banned = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, bad_words=[word]),
                          use_tqdm=False)[0].outputs[0]
    assert base.token_ids[0] not in banned.token_ids and word not in banned.text.split()
    rep = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, logit_bias={42: 8.0},
                                                 frequency_penalty=2.0, presence_penalty=2.0),
                       use_tqdm=False)[0].outputs[0]
    assert rep.token_ids.count(42) < biased.token_ids.count(42)             # the bias fades as 42 repeats


def test_stop_string_kept_and_special_tokens(llm):
    prompt = "w1 w2 w3"
    base = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0]
    stop = base.text.split()[2]
    cut = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, stop=stop), use_tqdm=False)[0].outputs[0]
    kept = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, stop=stop, include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == cut.text + stop and kept.stop_reason == stop and kept.finish_reason == "stop"
    events = list(llm.stream([prompt], SamplingParams(temperature=0, max_tokens=8, stop=stop,
                                                      include_stop_str_in_output=True)))
    assert "".join(e.text for e in events) == kept.text
    eos_first = dict(temperature=0, max_tokens=4, logit_bias={EOS: 100.0})
    skip = llm.generate(prompt, SamplingParams(**eos_first), use_tqdm=False)[0].outputs[0]
    keep = llm.generate(prompt, SamplingParams(**eos_first, skip_special_tokens=False), use_tqdm=False)[0].outputs[0]
    assert skip.token_ids == keep.token_ids == [EOS] and skip.finish_reason == "stop"
    assert skip.text == "" and keep.text.strip() == "[EOS]"
    quiet = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=3, detokenize=False), use_tqdm=False)
    assert quiet[0].outputs[0].text is None and quiet[0].outputs[0].token_ids == base.token_ids[:3]
    check_free(llm)


def test_truncate_prompt_tokens_and_max_tokens_none(model):
    llm = LLM(model, num_blocks=64, block_size=4, max_model_len=16)
    out = llm.generate([list(range(1, 30))], SamplingParams(temperature=0, max_tokens=4, truncate_prompt_tokens=5),
                       use_tqdm=False)[0]
    assert out.prompt_token_ids == list(range(25, 30)) and len(out.outputs[0].token_ids) == 4
    out = llm.generate([list(range(1, 30))], SamplingParams(temperature=0, max_tokens=None,
                                                           truncate_prompt_tokens=-1), use_tqdm=False)[0]
    assert len(out.prompt_token_ids) == 15 and len(out.outputs[0].token_ids) == 1    # up to max_model_len
    out = llm.generate([[1, 2]], SamplingParams(temperature=0, max_tokens=None), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 14 and out.finish_reason == "length"


def test_generation_config_defaults_and_eos(model, tmp_path):
    probe = LLM(model, num_blocks=64, block_size=4)
    greedy = probe.generate([[3, 4]], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0].outputs[0]
    eos = greedy.token_ids[2]
    cfg = {"temperature": 0.0, "top_p": 0.9, "top_k": 7, "max_new_tokens": 5, "repetition_penalty": -1,
           "eos_token_id": [eos, 999]}
    (tmp_path / "generation_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="repetition_penalty"):
        llm = LLM(model, num_blocks=64, block_size=4, generation_config=str(tmp_path))
    d = llm.get_default_sampling_params()
    assert (d.temperature, d.top_p, d.top_k, d.max_tokens, d.repetition_penalty) == (0.0, 0.9, 7, 5, 1.0)
    assert {eos, 999} <= llm.eos_ids
    out = llm.generate([[3, 4]], use_tqdm=False)[0].outputs[0]             # defaults: greedy, EOS from the file
    k = greedy.token_ids.index(eos) + 1
    assert out.token_ids == greedy.token_ids[:k] and out.finish_reason == "stop"
    ignored = LLM(model, num_blocks=64, block_size=4, generation_config=None)
    assert ignored.get_default_sampling_params() == SamplingParams() and not ignored.eos_ids


# ---- bad input: a clear error naming the argument ----------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature="0.5"), TypeError, "temperature"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(stop_token_ids=["a"]), TypeError, "stop_token_ids"),
    (dict(logprobs=True), TypeError, "logprobs"),
    (dict(n=0), ValueError, "n"),
    (dict(max_tokens=0), ValueError, "max_tokens"),
    (dict(presence_penalty=3.0), ValueError, "presence_penalty"),
    (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
    (dict(logit_bias={"a": 1.0}), TypeError, "logit_bias"),
    (dict(truncate_prompt_tokens=0), ValueError, "truncate_prompt_tokens"),
    (dict(logprobs_mode="processed"), ValueError, "logprobs_mode"),
    (dict(stop=[""]), ValueError, "stop"),
])
def test_bad_sampling_params(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SamplingParams(**kwargs)


def test_bad_engine_arguments_and_prompts(model):
    for kwargs, exc, match in [(dict(max_model_len=0), ValueError, "max_model_len"),
                               (dict(max_model_len=-5), ValueError, "max_model_len"),
                               (dict(max_model_len=10**6), ValueError, "max_position_embeddings"),
                               (dict(block_size=0), ValueError, "block_size"),
                               (dict(num_blocks=0), ValueError, "num_blocks"),
                               (dict(max_num_seqs=1.5), TypeError, "max_num_seqs"),
                               (dict(logprobs_mode="x"), ValueError, "logprobs_mode")]:
        with pytest.raises(exc, match=match):
            LLM(model, **{"num_blocks": 8, **kwargs})
    with pytest.warns(UserWarning, match="max_position_embeddings"):
        long = LLM(model, num_blocks=8, block_size=4, max_model_len=1024, allow_long_max_model_len=True)
    assert long.max_model_len == 1024
    llm = LLM(model, num_blocks=32, block_size=4)
    for prompts, exc, match in [(None, TypeError, "prompts"), ([[1.7, 2.2]], TypeError, "float"),
                                ([1.7, 2.2], TypeError, "float"), (torch.tensor([1.5, 2.0]), TypeError, "tensor"),
                                ([[1, 2], {"x": 1}], TypeError, "prompts\\[1\\]"), ([], ValueError, "empty")]:
        with pytest.raises(exc, match=match):
            llm.generate(prompts, use_tqdm=False)
    import numpy as np

    ok = llm.generate([np.array([1, 2, 3]), torch.tensor([4, 5])], SamplingParams(max_tokens=2), use_tqdm=False)
    assert [o.prompt_token_ids for o in ok] == [[1, 2, 3], [4, 5]]
    with pytest.raises(TypeError, match="float"):
        llm.generate([np.array([1.5, 2.0])], use_tqdm=False)
    with pytest.raises(TypeError, match="sampling_params"):
        llm.generate([[1, 2]], {"temperature": 0}, use_tqdm=False)
    check_free(llm)


def test_chat_renders_once_with_one_bos(model):
    from tokenizers import processors

    from train.toy import char_tokenizer

    tok = char_tokenizer()
    tok.chat_template = "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}" \
                        "{% if add_generation_prompt %}<assistant>{% endif %}"
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    assert tok.encode("a")[0] == 0                                            # this tokenizer adds a BOS itself
    llm = LLM(MockPagedModel(vocab_size=128, seed=3), num_blocks=64, block_size=8, tokenizer=tok)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "1+1"}]}]
    outs = llm.chat([conv, conv[1:]], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    text = "<bos><system>Be brief.\n<user>1+1\n<assistant>"
    assert outs[0].prompt == text and outs[0].prompt_token_ids == tok.encode(text, add_special_tokens=False)
    assert outs[0].prompt_token_ids.count(0) == 1 and outs[0].prompt_token_ids[0] == 0
    assert outs[1].prompt == "<bos><user>1+1\n<assistant>" and len(outs[1].outputs[0].token_ids) == 3
    single = llm.chat(conv, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert single[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    tmpl = llm.chat(conv[1:], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False,
                    chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}", add_generation_prompt=False)
    assert tmpl[0].prompt == "1+1"
    with pytest.raises(ValueError, match="role"):
        llm.chat([{"role": "wizard", "content": "x"}], use_tqdm=False)
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        llm.chat(conv, use_tqdm=False)


def test_prompt_logprobs_on_the_moe_model():
    """The MoE model's forward_paged returns logits for every index the engine names (logits_indices [M])."""
    from tiny_models import make_model

    m = make_model("tiny-v2")
    llm = LLM(m, num_blocks=32, block_size=8, max_num_batched_tokens=5, max_num_seqs=1)
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1, logprobs=1),
                       use_tqdm=False)[0]
    with torch.no_grad():
        ref = m(torch.tensor([prompt + out.outputs[0].token_ids])).logits[0].float().log_softmax(-1)
    for p in range(1, len(prompt)):
        assert math.isclose(out.prompt_logprobs[p][prompt[p]].logprob, float(ref[p - 1, prompt[p]]), abs_tol=1e-4)
    t = out.outputs[0].token_ids[0]
    assert math.isclose(out.outputs[0].logprobs[0][t].logprob, float(ref[len(prompt) - 1, t]), abs_tol=1e-4)


def test_fast_decode_equals_tokenizer_decode():
    """The detokenizer's direct Rust path gives tokenizer.decode's text (specials, added tokens, unknown ids)."""
    import random

    from model.engine.detokenizer import _decode
    from train.toy import char_tokenizer

    rng = random.Random(0)
    for tok in (char_tokenizer(), word_tokenizer(V)):
        assert hasattr(tok, "backend_tokenizer") and not tok.clean_up_tokenization_spaces   # the fast path runs
        for skip in (True, False):
            p = SamplingParams(skip_special_tokens=skip)
            for _ in range(200):
                ids = [rng.randrange(len(tok) + 5) for _ in range(rng.randrange(12))]
                assert _decode(tok, ids, p) == tok.decode(ids, skip_special_tokens=skip), ids
