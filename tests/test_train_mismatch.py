"""Sampler-trainer mismatch in the GRPO trainer (issue 14): routing replay and exact log-probs on the toy run
(fp32: router_agreement 1.0, logprob_gap <= 1e-5, with and without the skipped recompute), truncated importance
sampling against a deliberately perturbed engine (weights < 1, truncated fraction logged, loss and gradients equal
to a reference computation), and DAPO done fully (accuracy filter, resampling rounds, overlong filtering)."""

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch

from dsmath_kernels.reference.grpo import grpo_loss_ref
from train import grpo
from train.config import GRPOConfig, parse_config
from train.grpo import (
    backward_minibatch,
    build_batch,
    collect,
    old_logprobs,
    pack,
    replay_on,
    run,
    skip_recompute,
    tis_weights,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _toy(out, *extra):
    return parse_config(["--config", "toy", "--out", str(out), "--steps", "3", "--warmstart-steps", "20",
                         "--problems-per-step", "4", "--group-size", "4", "--save-every", "0", *extra])


def test_fp32_replay_agreement_and_gap(tmp_path):
    """The proof on the toy run: with replay, fp32, the engine's and the trainer's log-probs agree to 1e-5 and the
    routers agree everywhere — whether the old log-probs are recomputed or taken from the engine (skip)."""
    runs = {}
    for name, flags in {"skip": [], "recompute": ["--skip-recompute", "false"],
                        "no_replay": ["--routing-replay", "false"]}.items():
        runs[name] = run(_toy(tmp_path / name, *flags))
    for name in ("skip", "recompute"):
        for m in runs[name]:
            assert m["routing_replay"] is True and m["recompute_skipped"] is (name == "skip")
            assert m["router_agreement"] == 1.0, (name, m)
            assert m["logprob_gap"] <= 1e-5 and m["logprob_gap_max"] <= 1e-4, (name, m)
            assert m["tis_truncated_frac"] == 0.0
    for m in runs["no_replay"]:  # logged, whatever they are
        assert m["routing_replay"] is False and m["recompute_skipped"] is False
        assert 0.0 <= m["router_agreement"] <= 1.0 and math.isfinite(m["logprob_gap"])
    # the same samples and the same update up to the ~1e-7 gap: skipping the recompute changes nothing else
    for a, b in zip(runs["skip"], runs["recompute"]):
        assert a["reward_mean"] == b["reward_mean"] and a["resp_len"] == b["resp_len"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3, abs=1e-6)


def test_skip_and_replay_conditions():
    moe, dense = SimpleNamespace(num_moe_layers=2), SimpleNamespace(num_moe_layers=0)
    cfg = GRPOConfig()
    assert replay_on(cfg, moe) and not replay_on(cfg, dense)  # default: on for MoE policies
    assert skip_recompute(cfg, moe, True) and skip_recompute(cfg, dense, False)
    for change in ({"mu": 2}, {"minibatches": 2}, {"dtype": "bfloat16"}, {"skip_recompute": False}):
        assert not skip_recompute(GRPOConfig(**change), moe, True), change
    assert not skip_recompute(cfg, moe, False)  # MoE without replay: routing may differ
    with pytest.raises(ValueError, match="routing_replay"):
        replay_on(GRPOConfig(routing_replay=True), dense)
    c = parse_config(["--routing-replay", "true", "--tis-cap", "0", "--tis-mode", "sequence_mask",
                      "--mask-truncated-completions", "true", "--max-resample-rounds", "2"])
    assert (c.routing_replay, c.tis_cap, c.tis_mode, c.mask_truncated_completions, c.max_resample_rounds) == \
        (True, 0.0, "sequence_mask", True, 2)
    for bad in (["--tis-mode", "seq"], ["--tis-cap", "0.5"], ["--max-resample-rounds", "-1"]):
        with pytest.raises(ValueError, match=bad[0][2:].replace("-", "_")):
            parse_config(bad)


def test_tis_weights_token_and_sequence_mask():
    mask = torch.tensor([[True, True, True, False], [True, True, False, False], [False] * 4])
    engine = torch.zeros(3, 4)
    old = torch.tensor([[0.0, 1.0, -1.0, 9.0], [2.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    w, cut = tis_weights(old, engine, mask, 2.0, "token")
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, math.exp(-1), 1.0], [2.0, 1.0, 1.0, 1.0], [1.0] * 4]))
    assert cut.tolist() == [[False, True, False, False], [True, False, False, False], [False] * 4]
    w, cut = tis_weights(old, engine, mask, 2.0, "sequence_mask")  # geometric means: e^0, e^1 > 2, (empty) e^0
    assert w[:, 0].tolist() == [1.0, 0.0, 1.0] and cut.sum() == 2 and cut[1, :2].all()


@pytest.fixture(scope="module")
def toy_setup(tmp_path_factory):
    """A warm-started toy policy and its engine."""
    cfg = parse_config(["--config", "toy", "--warmstart-steps", "20", "--out", str(tmp_path_factory.mktemp("toy"))])
    policy, _, tokenizer, _, _, _, _ = grpo.build(dataclasses.replace(cfg, resume=False, beta=0.0))
    return cfg, policy, tokenizer, grpo.make_engine(policy.lm, tokenizer, cfg)


def test_tis_against_a_perturbed_engine(toy_setup):
    """The engine samples at temperature 1.4 while the trainer scores at 1.0: the old log-probs differ from the
    engine's, TIS weights are min(exp(old - engine), C) (many below 1, some cut at C) and the loss and gradients of
    the trainer's step equal a float64 reference computation with independently computed weights."""
    cfg, policy, tokenizer, llm = toy_setup
    SamplingParams = grpo.model_module("engine").SamplingParams
    prompts = [tokenizer.encode(p) for p in ("1+2=", "3-1=", "2+2=")]
    outs = llm.generate(prompts, SamplingParams(n=4, temperature=1.4, max_tokens=8, seed=3, logprobs=0,
                                                logprobs_mode="processed_logprobs", return_routing=True),
                        use_tqdm=False)
    comps = [c for o in outs for c in o.outputs]
    b = pack([p for p in prompts for _ in range(4)], comps, tokenizer.pad_token_id, "cpu")
    b["adv"] = torch.randn(12)
    tcfg = GRPOConfig(temperature=1.0, tis_cap=1.5, beta=0.0, loss_type="grpo", micro_batch=5, max_tokens=8)
    measured = old_logprobs(policy, b, tcfg, replay=True, skip=False)
    mask = b["mask"]
    w_ref = torch.exp(b["old"] - b["engine_lp"]).clamp(max=1.5)
    assert ((w_ref < 1) & mask).any() and ((w_ref == 1.5) & mask).any()  # both sides of 1, some truncated
    torch.testing.assert_close(b["tis"][mask], w_ref[mask])
    assert measured["cut"] == float(((b["old"] - b["engine_lp"]).exp() > 1.5)[mask].sum()) > 0
    assert measured["agree"] == float(mask.sum())  # replay: the trainer's own routers still agree (fp32)
    # the trainer's step (3 micro batches, replay, TIS) vs one float64 reference over the whole batch
    policy.zero_grad(set_to_none=True)
    stats = {}
    backward_minibatch(policy, b, slice(0, 12), tcfg, stats, replay=True)
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad(set_to_none=True)
    hidden = policy.lm(b["ids"], routing=b["routing"], return_hidden=True).hidden
    w = policy.lm.lm_head.weight
    loss64, _ = grpo_loss_ref(hidden.double(), w.double(), b["targets"], mask, b["adv"].double(),
                              old_logprobs=b["old"].double(), beta=0.0, temperature=1.0, loss_type="grpo",
                              token_weights=w_ref.double())
    loss64.backward()
    assert stats["objective"] == pytest.approx(float(loss64.detach()), rel=1e-4, abs=1e-7)
    for n, g in grads.items():
        ref = policy.get_parameter(n).grad
        assert ((g - ref).norm() / ref.norm().clamp(min=1e-12)) < 1e-4, n
    assert any(n.endswith("mlp.gate.weight") and g.abs().sum() > 0 for n, g in grads.items())  # routers learn


def test_truncated_fraction_is_logged(tmp_path, monkeypatch):
    """A full step whose engine samples at another temperature than the trainer's: tis_truncated_frac > 0."""
    real = grpo.sample

    def hot(llm, prompts, cfg, step, first):
        return real(llm, prompts, dataclasses.replace(cfg, temperature=1.6), step, first)

    monkeypatch.setattr(grpo, "sample", hot)
    hist = run(_toy(tmp_path, "--steps", "1", "--tis-cap", "1.2", "--beta", "0"))
    m = hist[0]
    assert m["recompute_skipped"] and m["tis_truncated_frac"] == 0.0  # skipped: old = engine, nothing to correct
    hist = run(_toy(tmp_path / "b", "--steps", "1", "--tis-cap", "1.2", "--beta", "0", "--skip-recompute", "false"))
    m = hist[0]
    assert 0.0 < m["tis_truncated_frac"] < 1.0 and m["logprob_gap"] > 1e-3
    lines = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert lines[0]["tis_truncated_frac"] == m["tis_truncated_frac"]


# ---- DAPO: dynamic sampling on accuracy, resampling rounds, overlong filtering


class _Tok:
    pad_token_id = 0


def _fake_rollouts(monkeypatch, informative: set):
    """sample() -> G fake completions per prompt (the first one truncated at max_tokens); score(): problems in
    `informative` get half their samples right, even problems all right, odd ones all wrong — and every group's
    total reward carries a format term that differs inside the group (which must not make a group informative)."""
    def fake_sample(llm, prompts, cfg, step, first):
        return [SimpleNamespace(token_ids=[5, 6, 1], token_logprobs=[-1.0] * 3, text=f"{p[0]} {i}", routing=None,
                                finish_reason="length" if i == 0 else "stop")
                for p in prompts for i in range(cfg.group_size)]

    def fake_score(comps, golds, tokenizer, pool, cfg):
        pid = [int(c.text.split()[0]) for c in comps]
        idx = [int(c.text.split()[1]) for c in comps]
        correct = torch.tensor([float(i % 2) if p in informative else float(p % 2 == 0) for p, i in zip(pid, idx)])
        return correct + 0.1 * torch.tensor([float(i % 2) for i in idx]), correct

    monkeypatch.setattr(grpo, "sample", fake_sample)
    monkeypatch.setattr(grpo, "score", fake_score)
    monkeypatch.setattr(grpo, "prompt_of", lambda problem, tokenizer, cfg: [int(problem)])


def _problems(n):
    from train.data import Problem, ProblemSampler

    return ProblemSampler([Problem(str(i), "0", str(i)) for i in range(n)], seed=0)


def test_dapo_filters_on_accuracy_and_resampling_is_bounded(monkeypatch):
    _fake_rollouts(monkeypatch, informative={3})  # one informative problem per epoch of 12
    cfg = GRPOConfig(problems_per_step=4, group_size=4, drop_equal_groups=True, max_resample_rounds=5, prompt="raw",
                     mask_truncated_completions=True)
    sampler = _problems(12)
    order = [int(p.problem) for p in _problems(12).next(24)]
    kept, sampled, rounds, _, _ = collect(0, SimpleNamespace(), None, _Tok(), sampler, None, cfg)
    assert rounds == 5 and [int(g.prompt[0]) for g in sampled] == order  # 1 + 5 rounds of fresh problems
    assert all(not g.informative for g in sampled if int(g.prompt[0]) != 3)  # rewards differ, accuracy does not
    assert all(len(set(g.reward.tolist())) == 2 for g in sampled)
    assert [g.informative for g in kept] == [True, True, False, False]  # 2 found, then 2 fillers (masked)
    b = build_batch(kept, cfg, 0, "cpu")
    rows = b["mask"].any(1).view(4, 4).tolist()
    assert rows[:2] == [[False, True, True, True]] * 2  # the truncated first sample leaves the loss
    assert rows[2:] == [[False] * 4] * 2  # uninformative fillers leave the loss


def test_dapo_stops_resampling_when_the_batch_is_full(monkeypatch):
    _fake_rollouts(monkeypatch, informative={4, 5, 6, 7})
    cfg = GRPOConfig(problems_per_step=4, group_size=2, drop_equal_groups=True, max_resample_rounds=5, prompt="raw")
    kept, sampled, rounds, _, _ = collect(0, SimpleNamespace(), None, _Tok(), _problems(8), None, cfg)
    assert sorted(int(g.prompt[0]) for g in kept) == [4, 5, 6, 7]
    assert rounds == 1 and len(sampled) == 8  # all four informative problems are in the first epoch of 8
    cfg.drop_equal_groups = False  # no dynamic sampling: one round, groups in order, none masked
    kept, sampled, rounds, _, _ = collect(0, SimpleNamespace(), None, _Tok(), _problems(8), None, cfg)
    assert rounds == 0 and kept == sampled and len(kept) == 4
    assert build_batch(kept, cfg, 0, "cpu")["mask"].any(1).all()
