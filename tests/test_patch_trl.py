"""dsmath_kernels.hf.grpo_compute_loss — TRL GRPOTrainer.compute_loss from the policy's last hidden states with the
fused grpo_loss — on a tiny Qwen3-MoE, with a stand-in trainer carrying TRL's attributes (TRL is optional): loss
and gradients equal TRL's formula on full logits for each supported loss type, with and without the KL term and
the router aux loss; TRL's metrics are logged; unsupported configurations warn and run TRL's own loss. When TRL is
installed, also against TRL's own GRPOTrainer._compute_loss."""

import copy
import types
from collections import defaultdict
from contextlib import nullcontext

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_patch import hf_model, rel_err  # noqa: E402

import dsmath_kernels  # noqa: E402
from dsmath_kernels.hf import grpo_compute_loss  # noqa: E402

REL = 1e-4
B, P, C = 4, 5, 7
pytestmark = pytest.mark.usefixtures("one_thread")


class Accelerator:
    """What TRL's loss uses of accelerate.Accelerator, for one process."""
    num_processes = 1

    def unwrap_model(self, model):
        return model

    def autocast(self):
        return nullcontext()

    def reduce(self, t, reduction="sum"):
        return t

    def gather(self, t):
        return t

    gather_for_metrics = gather


def trainer_for(model, **kw):
    t = types.SimpleNamespace(
        model=model, accelerator=Accelerator(), args=types.SimpleNamespace(delta=None, use_bias_correction_kl=False,
                                                                           steps_per_generation=2),
        loss_type="grpo", beta=0.0, epsilon_low=0.2, epsilon_high=0.28, temperature=0.9,
        importance_sampling_level="token", top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False,
        vllm_importance_sampling_correction=False, aux_loss_enabled=False, router_aux_loss_coef=0.0,
        _entropy_bonus_enabled=False, max_completion_length=C + 3, current_gradient_accumulation_steps=3,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    for k, v in kw.items():
        setattr(t, k, v)
    return t


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, :2] = 0  # left padding
    completion_mask = torch.ones(B, C, dtype=torch.long)
    completion_mask[0, 4:] = 0  # right padding
    completion_mask[2, 1:] = 0
    return {"prompt_ids": torch.randint(2, 128, (B, P), generator=g), "prompt_mask": prompt_mask,
            "completion_ids": torch.randint(2, 128, (B, C), generator=g), "completion_mask": completion_mask,
            "advantages": torch.randn(B, generator=g), "num_items_in_batch": completion_mask.sum() * 2.0}


def with_old_and_ref(model, inputs, temperature, seed=1):
    """old / ref log-probs near the policy's, so ratios clip on both sides and the KL is not zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        logp = full_logits_logps(model, inputs, temperature)
    inputs["old_per_token_logps"] = logp + 0.3 * torch.randn(logp.shape, generator=g)
    inputs["ref_per_token_logps"] = logp + 0.3 * torch.randn(logp.shape, generator=g)
    return inputs


def full_logits_logps(model, inputs, temperature):
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -C - 1:-1] / temperature
    return torch.log_softmax(logits.float(), -1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)


def trl_formula(trainer, model, inputs):
    """TRL 1.16 GRPOTrainer._compute_loss for token-level importance sampling, on full logits."""
    logp = full_logits_logps(model, inputs, trainer.temperature)  # [B, C]
    mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)
    adv = inputs["advantages"].unsqueeze(1)
    old = inputs.get("old_per_token_logps", logp.detach())
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - trainer.epsilon_low, 1 + trainer.epsilon_high)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction:
        per_token = per_token * inputs["importance_sampling_ratio"]
    if trainer.beta != 0.0:
        d = inputs["ref_per_token_logps"] - logp
        per_token = per_token + trainer.beta * (torch.exp(d) - d - 1)
    ga = trainer.current_gradient_accumulation_steps
    if trainer.loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / ga
    if trainer.loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0) / ga
    if trainer.loss_type == "dr_grpo":
        return (per_token * mask).sum() / (B * trainer.max_completion_length) / ga
    normalizer = inputs["num_items_in_batch"].clamp(min=1.0) * ga / trainer.args.steps_per_generation
    return (per_token * mask).sum() / normalizer  # dapo


def assert_grads_match(a, b):
    for (name, p), (_, r) in zip(a.named_parameters(), b.named_parameters()):
        assert (p.grad is None) == (r.grad is None), name
        if r.grad is not None and r.grad.abs().max() > 0:
            assert rel_err(p.grad, r.grad) <= REL, f"{name}: {rel_err(p.grad, r.grad):.3g}"


@pytest.fixture(scope="module")
def policy():
    return hf_model("tiny-qwen3").train()


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_grads_equal_trl_formula(policy, loss_type, beta):
    ref = copy.deepcopy(policy)
    ours = copy.deepcopy(policy)
    dsmath_kernels.patch(ours)
    trainer = trainer_for(ours, loss_type=loss_type, beta=beta)
    inputs = with_old_and_ref(ref, batch(), trainer.temperature)
    inputs["tool_mask"] = torch.ones(B, C, dtype=torch.long)
    inputs["tool_mask"][3, 2:4] = 0
    loss = grpo_compute_loss(trainer, ours, inputs)
    expected = trl_formula(trainer, ref, inputs)
    assert rel_err(loss, expected) <= REL
    loss.backward()
    expected.backward()
    assert_grads_match(ours, ref)
    logged = trainer._metrics["train"]
    assert set(logged) >= {"entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"}
    assert ("kl" in logged) == (beta != 0.0)
    assert logged["clip_ratio/region_mean"][0] > 0  # the perturbed old log-probs make ratios clip


@pytest.mark.parametrize("shape", [(B, C), (B, 1)])  # TRL's token- and sequence-level IS modes
def test_vllm_importance_sampling_correction(policy, shape):
    ref = copy.deepcopy(policy)
    ours = copy.deepcopy(policy)
    trainer = trainer_for(ours, use_vllm=True, vllm_importance_sampling_correction=True, beta=0.04)
    inputs = with_old_and_ref(ref, batch(), trainer.temperature)
    inputs["importance_sampling_ratio"] = torch.rand(shape, generator=torch.Generator().manual_seed(3)) * 2
    loss = grpo_compute_loss(trainer, ours, inputs)
    expected = trl_formula(trainer, ref, inputs)
    assert rel_err(loss, expected) <= REL
    loss.backward()
    expected.backward()
    assert_grads_match(ours, ref)


def test_router_aux_loss_is_added_as_trl_adds_it(policy):
    ours = copy.deepcopy(policy)
    trainer = trainer_for(ours, aux_loss_enabled=True, router_aux_loss_coef=0.01)
    inputs = batch()
    loss = grpo_compute_loss(trainer, ours, inputs)
    plain = grpo_compute_loss(trainer_for(ours), ours, inputs)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        aux = ours(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
    assert rel_err(loss - plain, 0.01 * aux / trainer.current_gradient_accumulation_steps) <= 1e-3
    assert trainer._metrics["train"]["aux_loss"] == [pytest.approx(aux.item(), rel=1e-4)]


@pytest.mark.parametrize("change", [{"loss_type": "cispo"}, {"importance_sampling_level": "sequence"},
                                    {"top_entropy_quantile": 0.5}, {"_entropy_bonus_enabled": True},
                                    {"off_policy_mask_threshold": 0.5}])
def test_unsupported_configurations_warn_and_run_trls_loss(policy, change):
    trainer = trainer_for(policy, **change)
    trainer._compute_loss = lambda model, inputs: "trl's own loss"
    with pytest.warns(RuntimeWarning, match="grpo_loss"):
        assert grpo_compute_loss(trainer, policy, batch()) == "trl's own loss"


def test_return_outputs_is_refused(policy):
    with pytest.raises(ValueError, match="outputs"):
        grpo_compute_loss(trainer_for(policy), policy, batch(), return_outputs=True)


@pytest.mark.parametrize("loss_type,beta", [("grpo", 0.04), ("dapo", 0.0)])
def test_equals_trls_own_compute_loss(policy, loss_type, beta):
    """TRL's GRPOTrainer._compute_loss, run on the same stand-in trainer with TRL's own fused LM head."""
    trl = pytest.importorskip("trl")
    from trl.trainer.utils import add_fused_lm_head

    ref = copy.deepcopy(policy)
    ours = copy.deepcopy(policy)
    trainer = trainer_for(ours, loss_type=loss_type, beta=beta)
    add_fused_lm_head(ref, temperature=trainer.temperature, outputs=("log_probs", "entropy"))
    ref_trainer = trainer_for(ref, loss_type=loss_type, beta=beta)
    ref_trainer._get_per_token_logps_and_entropies = types.MethodType(
        trl.GRPOTrainer._get_per_token_logps_and_entropies.__wrapped__, ref_trainer)
    inputs = with_old_and_ref(ours, batch(), trainer.temperature)
    expected = trl.GRPOTrainer._compute_loss(ref_trainer, ref, inputs)
    loss = grpo_compute_loss(trainer, ours, inputs)
    assert rel_err(loss, expected) <= REL
    loss.backward()
    expected.backward()
    assert_grads_match(ours, ref)
    for name in ("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert trainer._metrics["train"][name] == pytest.approx(ref_trainer._metrics["train"][name], rel=1e-4)
