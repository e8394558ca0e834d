"""GRPO with TRL on a transformers MoE model running dsmath kernels: `dsmath_kernels.patch(model)` puts route_topk
and moe_experts into every MoE layer (and the fused LM-head loss), and `grpo_compute_loss` replaces
GRPOTrainer.compute_loss with dsmath's fused grpo_loss from the policy's last hidden states (no [B, C, V] logits).

The whole recipe is three lines on top of an ordinary TRL script:

    dsmath_kernels.patch(model)                       # before the trainer wraps the model
    class DsmathGRPOTrainer(GRPOTrainer):
        compute_loss = dsmath_kernels.hf.grpo_compute_loss

Supported: loss_type grpo / bnpo / dr_grpo / dapo with token-level importance sampling (TRL's defaults), any beta;
other TRL options warn and fall back to TRL's own loss (see dsmath_kernels/hf/trl_grpo.py).

Runs without a download by default: a tiny random Qwen3-MoE, a character tokenizer and the toy arithmetic task
(a smoke test of the wiring, a few steps on a CPU). With a real model and data set:
  python examples/trl_grpo.py                                    # toy, CPU, ~1 min
  python examples/trl_grpo.py --model Qwen/Qwen3-30B-A3B --data ../shared/data/gsm8k/test.jsonl --dataset gsm8k \\
      --steps 100 --batch 8 --generations 8 --max-completion 1024 --bf16
Needs `pip install trl` (TRL is optional for dsmath; nothing else imports it)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dsmath_kernels  # noqa: E402


def tiny_policy():
    """A tiny random Qwen3-MoE and the toy character tokenizer (no download)."""
    import transformers

    from model.presets import preset_dict
    from train.toy import char_tokenizer

    tok = char_tokenizer()
    cfg = transformers.AutoConfig.for_model(**preset_dict("tiny-qwen3", pad_token_id=tok.pad_token_id,
                                                          eos_token_id=tok.eos_token_id,
                                                          bos_token_id=tok.bos_token_id))
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg), tok


def problems(args):
    from train.data import load_problems
    from train.toy import toy_problems

    if args.data:
        return load_problems(args.data, args.dataset)[: args.max_problems]
    return toy_problems()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="transformers model id or path (default: tiny random Qwen3-MoE)")
    p.add_argument("--data", default=None, help="JSONL problems (default: the toy arithmetic task)")
    p.add_argument("--dataset", default="custom", help="layout of --data: math500, gsm8k, aime24, amc23, custom")
    p.add_argument("--max-problems", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4, help="completions per device per step")
    p.add_argument("--generations", type=int, default=4, help="completions per prompt (GRPO group size)")
    p.add_argument("--max-completion", type=int, default=8)
    p.add_argument("--loss-type", default="grpo", choices=["grpo", "bnpo", "dr_grpo", "dapo"])
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--output-dir", default=None)
    args = p.parse_args()

    import datasets
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    from train.data import build_prompt
    from train.rewards import math_rewards

    if args.model:
        tok = transformers.AutoTokenizer.from_pretrained(args.model)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            args.model, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    else:
        model, tok = tiny_policy()
    print(dsmath_kernels.patch(model))  # what runs on dsmath kernels, and what was left and why

    class DsmathGRPOTrainer(GRPOTrainer):
        compute_loss = dsmath_kernels.hf.grpo_compute_loss

    rows = [{"prompt": pr.problem if not args.data else build_prompt(pr.problem, tok), "answer": pr.answer}
            for pr in problems(args)]

    def reward(completions, answer, **kwargs):
        return math_rewards(completions, answer)

    config = GRPOConfig(
        output_dir=args.output_dir or tempfile.mkdtemp(prefix="dsmath_trl_grpo_"), max_steps=args.steps,
        per_device_train_batch_size=args.batch, num_generations=args.generations,
        max_completion_length=args.max_completion, loss_type=args.loss_type, beta=args.beta,
        learning_rate=args.lr, logging_steps=1, report_to="none", save_strategy="no", bf16=args.bf16,
        use_cpu=not torch.cuda.is_available())
    trainer = DsmathGRPOTrainer(model=model, reward_funcs=reward, args=config, processing_class=tok,
                                train_dataset=datasets.Dataset.from_list(rows))
    trainer.train()
    for entry in trainer.state.log_history:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()})


if __name__ == "__main__":
    main()
