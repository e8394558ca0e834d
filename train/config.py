"""GRPO run configuration: one dataclass, named presets, a JSON/TOML file, and CLI overrides.

    python -m train.grpo --config toy --out runs/toy               # a preset
    python -m train.grpo --config my_run.json --lr 2e-6 --group-size 16   # a file, then flags (--field-name)

Precedence: dataclass defaults (DeepSeekMath's) < preset or file < command-line flags. Every field is a flag
(`group_size` -> `--group-size`; booleans take true/false).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass

from .data import FEWSHOT_SETS, PROMPT_STYLES


@dataclass
class GRPOConfig:
    # ---- policy and data
    model: str = "tiny"              # checkpoint directory, or a model preset name (random init)
    tokenizer: str | None = None     # directory; "char" = train.toy's char tokenizer; None = the model directory's
    data: str = "toy"                # JSONL file, or "toy" (train.toy arithmetic)
    dataset: str = "custom"          # math500 | aime24 | amc23 | gsm8k | custom (field layout)
    problem_key: str = "problem"
    answer_key: str = "answer"
    prompt: str = "auto"             # auto | chat | qwen-math | deepseek-r1 | few-shot | plain | raw (train/data.py)
    system: str | None = None        # system prompt (chat and plain styles)
    chat_template_kwargs: str | None = None  # JSON object for apply_chat_template, e.g. {"enable_thinking": false}
    fewshot: str | None = None       # few-shot exemplars: minerva-math | gsm8k-cot (default: by dataset)
    max_prompt_length: int = 1024    # problems whose prompt has more tokens are skipped (counted and logged at start)
    # ---- sampling (DeepSeekMath: 64 samples per question, 1024 tokens)
    steps: int = 1000
    problems_per_step: int = 16      # P, across all ranks
    group_size: int = 64             # G
    max_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    # ---- objective (DeepSeekMath GRPO: beta 0.04, eps 0.2, per-sequence mean, std-normalized advantages)
    loss_type: str = "grpo"          # grpo | dapo (token-level mean) | dr_grpo (sum / (B * max_tokens))
    beta: float = 0.04               # KL(pi || ref) weight (k3 estimator); 0 skips the reference model
    eps_low: float = 0.2
    eps_high: float = 0.2            # DAPO clip-higher: 0.28
    normalize: str = "std"           # std | none (Dr. GRPO: no division by the group std)
    drop_equal_groups: bool = False  # DAPO dynamic sampling: groups all correct or all wrong (accuracy, not total
                                     #   reward) leave the loss and new problems are sampled until the batch holds
                                     #   problems_per_step informative groups
    max_resample_rounds: int = 4     # DAPO: extra sampling rounds per step at most (then train on what there is)
    mask_truncated_completions: bool = False  # DAPO overlong filtering: completions cut at max_tokens leave the loss
    mu: int = 1                      # optimisation passes over each sampled batch (DeepSeekMath: 1)
    minibatches: int = 1             # optimizer steps per pass
    micro_batch: int = 8             # sequences per forward/backward (gradient accumulation; --plan-memory sizes it)
    # ---- sampler-trainer mismatch (notes in train/README.md, "Log-probs that match")
    routing_replay: bool | None = None  # R3: the trainer's forwards (old, reference, new) use the experts the engine
                                     #   picked for each token; None = on for MoE policies
    skip_recompute: bool = True      # old log-probs = the engine's where the gap is zero by construction (mu = 1, one
                                     #   minibatch, replay on or no MoE, float32): one forward pass fewer per step
    tis_cap: float = 2.0             # truncated importance sampling: the policy-gradient term of each token weighted
                                     #   by min(pi_old / pi_engine, C); 0 = off
    tis_mode: str = "token"          # token | sequence_mask (weight 0 for sequences whose geometric-mean ratio
                                     #   leaves [1/C, C], 1 for the others)
    # ---- reward terms
    format_weight: float = 0.0       # + w * format_reward (a \boxed{} answer present)
    overlong_buffer: int = 0         # DAPO soft overlong penalty over the last N tokens (0: off)
    reward_timeout: float = 5.0
    reward_workers: int | None = None
    # ---- optimizer (DeepSeekMath: lr 1e-6)
    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"       # constant | cosine (after warm-up, down to min_lr_ratio * lr)
    min_lr_ratio: float = 0.1
    # ---- system
    dtype: str | None = None         # compute: bfloat16 (default on CUDA; fp32 master shards) | float32 (CPU default)
    ref_offload: bool = False        # reference shards in pinned host memory (FSDP2 CPU offload; CUDA + torchrun)
    rollout_offload: bool = False    # policy shards + AdamW state in host memory while the engine is awake
    activation_checkpointing: bool | None = None  # recompute each decoder layer in backward; None: on with CUDA
    seed: int = 0
    threads: int | None = None       # torch CPU threads (1 is fastest for tiny models on a shared machine)
    engine_block_size: int = 64      # the engine's default (FlashMLA's size; 2,048 table entries at 128K)
    engine_max_num_seqs: int = 256
    engine_memory_fraction: float = 0.8  # of the GPU memory free for the KV cache while the engine is awake
    engine_cpu_kv_gib: float = 0.25  # KV cache size on a CPU
    # ---- output
    out: str = "runs/grpo"
    save_every: int = 100            # checkpoint every N steps (and at the end); 0: only at the end
    keep_checkpoints: int = 2
    export_dtype: str | None = None  # dtype of the final Hugging Face export (OUT/hf/step_N); None: the compute dtype
    resume: bool = True              # continue from OUT's latest checkpoint when there is one
    stop_after: int | None = None    # leave after this step (as if killed; for the resume test)
    # ---- toy warm start (format only; see train/toy.py)
    warmstart_steps: int = 0
    warmstart_lr: float = 3e-3
    toy_max_operand: int = 9         # toy task: operands 0..N
    warmstart_correct_frac: float = 0.0  # fraction of warm-start labels that are right (others: random digits)
    model_overrides: str | None = None  # JSON dict of config.json fields for a preset model
    init_std: float = 0.02           # random init of a preset model (normal std of the matrices)

    def validate(self) -> None:
        checks = [
            (self.loss_type in ("grpo", "dapo", "dr_grpo"), f"loss_type: grpo|dapo|dr_grpo, got {self.loss_type!r}"),
            (self.normalize in ("std", "none"), f"normalize: std|none, got {self.normalize!r}"),
            (self.schedule in ("constant", "cosine"), f"schedule: constant|cosine, got {self.schedule!r}"),
            (self.prompt in PROMPT_STYLES, f"prompt: {'|'.join(PROMPT_STYLES)}, got {self.prompt!r}"),
            (self.fewshot in (None, *FEWSHOT_SETS), f"fewshot: {'|'.join(FEWSHOT_SETS)}, got {self.fewshot!r}"),
            (self.max_prompt_length >= 1, f"max_prompt_length: must be >= 1, got {self.max_prompt_length}"),
            (self.dtype in (None, "float32", "bfloat16"), f"dtype: float32|bfloat16, got {self.dtype!r}"),
            (self.export_dtype in (None, "float32", "bfloat16", "float16"),
             f"export_dtype: float32|bfloat16|float16, got {self.export_dtype!r}"),
            (0.0 < self.engine_memory_fraction <= 1.0,
             f"engine_memory_fraction: must be in (0, 1], got {self.engine_memory_fraction}"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints: must be >= 1, got {self.keep_checkpoints}"),
            (self.group_size >= 1 and self.problems_per_step >= 1, "group_size and problems_per_step must be >= 1"),
            (self.mu >= 1 and self.minibatches >= 1 and self.micro_batch >= 1, "mu, minibatches, micro_batch >= 1"),
            (self.beta >= 0 and self.lr > 0, "beta >= 0 and lr > 0"),
            (self.tis_mode in ("token", "sequence_mask"), f"tis_mode: token|sequence_mask, got {self.tis_mode!r}"),
            (self.tis_cap == 0 or self.tis_cap >= 1, f"tis_cap: 0 (off) or >= 1, got {self.tis_cap}"),
            (self.max_resample_rounds >= 0, f"max_resample_rounds: >= 0, got {self.max_resample_rounds}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        self.template_kwargs()

    def template_kwargs(self) -> dict | None:
        """chat_template_kwargs parsed (a JSON object), or None."""
        if self.chat_template_kwargs is None:
            return None
        try:
            d = json.loads(self.chat_template_kwargs) if isinstance(self.chat_template_kwargs, str) \
                else self.chat_template_kwargs
        except json.JSONDecodeError as e:
            raise ValueError(f"chat_template_kwargs: not JSON ({e})") from e
        if not isinstance(d, dict):
            raise ValueError(f"chat_template_kwargs: expected a JSON object, got {self.chat_template_kwargs!r}")
        return d


PRESETS: dict[str, dict] = {
    "deepseekmath": {},  # the dataclass defaults
    "dapo": {"loss_type": "dapo", "eps_low": 0.2, "eps_high": 0.28, "beta": 0.0, "drop_equal_groups": True,
             "group_size": 16, "overlong_buffer": 256, "lr": 1e-6},
    "dr_grpo": {"loss_type": "dr_grpo", "normalize": "none", "beta": 0.0},
    # The CPU proof: a tiny MoE learns single-digit arithmetic (a+b, a-b, operands 0..3; see train/toy.py)
    "toy": {"model": "tiny", "init_std": 0.1, "tokenizer": "char", "data": "toy", "toy_max_operand": 3,
            "prompt": "raw", "steps": 150, "problems_per_step": 16, "group_size": 8, "max_tokens": 8,
            "temperature": 1.0, "beta": 0.04, "lr": 1e-3, "adam_beta2": 0.99, "micro_batch": 128,
            "warmup_steps": 5, "warmstart_steps": 60, "save_every": 50, "threads": 1, "reward_workers": 1,
            "engine_block_size": 16},  # prompts + answers are ~20 tokens
}


def _parse_value(field: dataclasses.Field, text: str):
    kind = str(field.type)
    if text.lower() in ("none", "null") and "None" in kind:
        return None
    if kind.startswith("bool"):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--{field.name}: expected true/false, got {text!r}")
        return text.lower() in ("true", "1")
    if kind.startswith("int"):
        return int(text)
    if kind.startswith("float"):
        return float(text)
    return text


def load_file(path: str) -> dict:
    if path.endswith(".toml"):
        import tomllib

        with open(path, "rb") as f:
            return tomllib.load(f)
    with open(path) as f:
        return json.load(f)


def parse_config(argv=None) -> GRPOConfig:
    """--config PRESET|FILE, then one flag per field."""
    ap = argparse.ArgumentParser(prog="python -m train.grpo", description="GRPO trainer (see train/grpo.py)")
    ap.add_argument("--config", default="deepseekmath", help=f"preset ({', '.join(PRESETS)}) or a .json/.toml file")
    fields = {f.name: f for f in dataclasses.fields(GRPOConfig)}
    for name in fields:
        ap.add_argument("--" + name.replace("_", "-"), dest=name, default=None)
    a = ap.parse_args(argv)
    if a.config in PRESETS:
        base = dict(PRESETS[a.config])
    elif os.path.exists(a.config):
        base = load_file(a.config)
    else:
        raise ValueError(f"--config: {a.config!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    unknown = set(base) - set(fields)
    if unknown:
        raise ValueError(f"--config: unknown fields {sorted(unknown)}")
    for name, f in fields.items():
        v = getattr(a, name)
        if v is not None:
            base[name] = _parse_value(f, v)
    cfg = GRPOConfig(**base)
    cfg.validate()
    return cfg
