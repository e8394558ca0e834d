"""Sampler: greedy, temperature, top-k, top-p, seeded per-row generators, log-probs of the sampled token (the
processed distribution here; tests/test_sampling_semantics.py covers raw log-probs, top-k lists and processors)."""

import pytest
import torch

from model.engine.sampler import Sampler, SeedStream
from model.engine.sampling_params import SamplingParams


def draw(sampler, logits, params, streams):
    """(tokens, processed log-probs: the temperature-scaled full distribution, the GRPO loss's)."""
    out = sampler(logits, params, streams, modes=["processed_logprobs"] * len(params))
    return out.tokens, out.logprobs


def test_greedy_and_logprob():
    logits = torch.randn(5, 11)
    tok, lp = draw(Sampler(), logits, [SamplingParams(temperature=0)] * 5, [None] * 5)
    assert torch.equal(tok, logits.argmax(-1))
    torch.testing.assert_close(lp, logits.log_softmax(-1).gather(-1, tok[:, None])[:, 0])


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(6, 50)
    ps = [SamplingParams(temperature=1.3, top_k=1)] * 3 + [SamplingParams(temperature=0.7, top_p=1e-6)] * 3
    tok, lp = draw(Sampler(), logits, ps, [None] * 6)
    assert torch.equal(tok, logits.argmax(-1))
    temps = torch.tensor([1.3] * 3 + [0.7] * 3)         # log-probs: the temperature-scaled FULL distribution
    torch.testing.assert_close(lp, (logits / temps[:, None]).log_softmax(-1).gather(-1, tok[:, None])[:, 0])


def test_mixed_batch_greedy_rows_unchanged():
    logits = torch.randn(4, 20)
    ps = [SamplingParams(temperature=0), SamplingParams(temperature=1.0)] * 2
    tok, lp = draw(Sampler(), logits, ps, [None] * 4)
    assert tok[0] == logits[0].argmax() and tok[2] == logits[2].argmax()
    full = logits.log_softmax(-1)
    torch.testing.assert_close(lp, full.gather(-1, tok[:, None])[:, 0])


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, -1, 1.0), (0.5, -1, 1.0), (1.0, 3, 1.0), (2.0, -1, 0.6),
                                                      (0.8, 4, 0.7)])
def test_frequencies_and_logprobs_match_the_distribution(temperature, top_k, top_p):
    V, B = 6, 6000
    base = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5, -1.0])
    scaled = base / temperature
    keep = torch.zeros(V, dtype=torch.bool)
    order = scaled.argsort(descending=True)
    k = top_k if top_k > 0 else V
    probs_sorted = scaled[order].softmax(-1)
    for r in range(k):   # nucleus: tokens whose preceding mass (after top-k) is < top_p
        mass = probs_sorted[:r].sum() / probs_sorted[:k].sum()
        if r == 0 or mass < top_p:
            keep[order[r]] = True
    want = torch.where(keep, scaled, torch.tensor(float("-inf"))).softmax(-1)
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)] * B
    tok, lp = draw(Sampler(seed=1), base.expand(B, V).clone(), params, [None] * B)
    freq = torch.bincount(tok, minlength=V).float() / B
    assert (freq[~keep] == 0).all()
    assert (freq - want).abs().max() < 0.03
    torch.testing.assert_close(lp, scaled.log_softmax(-1)[tok])  # the full distribution (the GRPO loss's), no cut


def test_logprobs_are_the_grpo_losses():
    """The engine reports exactly what dsmath_kernels.token_logprobs computes for the token at that temperature."""
    from dsmath_kernels import token_logprobs

    hidden, head = torch.randn(1, 8, 16), torch.randn(40, 16)
    for temperature in (1.0, 0.6, 1.7):
        ps = [SamplingParams(temperature=temperature, top_p=0.9)] * 8
        tok, lp = draw(Sampler(seed=3), hidden[0] @ head.T, ps, [None] * 8)
        want = token_logprobs(hidden, head, tok[None], temperature=temperature)[0]
        torch.testing.assert_close(lp, want, atol=2e-6, rtol=0)


def test_seeded_rows_do_not_depend_on_the_batch():
    V = 1000
    logits = torch.randn(1, V)
    p = SamplingParams(temperature=1.0, seed=7)

    def run(other_rows: int) -> list[int]:
        stream, sampler, toks = SeedStream(123, block=4), Sampler(seed=other_rows), []
        for _ in range(10):  # crosses stream blocks; other rows change every step
            rows = torch.cat([torch.randn(other_rows, V), logits])
            tok, _ = draw(sampler, rows, [SamplingParams()] * other_rows + [p], [None] * other_rows + [stream])
            toks.append(int(tok[-1]))
        return toks

    alone = run(0)
    assert alone == run(5) == run(17)
    assert len(set(alone)) > 1


def test_seed_stream_blocks_do_not_change_values():
    a, b = SeedStream(5, block=3), SeedStream(5, block=256)
    assert [a.next() for _ in range(10)] == [b.next() for _ in range(10)]


def test_unseeded_rows_vary():
    logits = torch.zeros(64, 100)
    tok, _ = draw(Sampler(), logits, [SamplingParams()] * 64, [None] * 64)
    assert len(set(tok.tolist())) > 20
