"""The toy task that proves the GRPO loop learns on a CPU: single-digit arithmetic answered in \\boxed{}.

- `char_tokenizer()`: a character-level transformers tokenizer built offline (a `tokenizers` WordLevel model over
  printable ASCII + newline, specials <bos> <eos> <pad> <unk>, plus `\\boxed{` as one token; 101 ids, within the
  tiny presets' vocab of 128).
- `toy_problems()`: "a+b=" and "a-b=" with single-digit operands and a single-digit result (a reward-checkable
  answer "c"); the prompt is the bare expression, the expected completion `\\boxed{c}` then EOS.
- `warm_start()`: a brief supervised pass on noisy labels — targets `\\boxed{r}<eos>` with r the right answer
  with probability `correct_frac`, else a random digit — so the policy answers in a box and is sometimes right
  (an "SFT model"); what it gains beyond that comes from GRPO. With correct_frac = 0 it learns the format only.
"""

from __future__ import annotations

import random

import torch

from .data import Problem

SPECIALS = ["<bos>", "<eos>", "<pad>", "<unk>"]
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def char_tokenizer(chat_template: bool = False):
    """A PreTrainedTokenizerFast with one token per character (no download)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + ["\n"] + [chr(c) for c in range(32, 127)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.add_tokens(["\\boxed{"])  # one token, as in real BPE vocabularies: the answer digit sits right after it
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def toy_problems(max_operand: int = 9) -> list[Problem]:
    """All a+b and a-b with a, b in 0..max_operand and a result in 0..9 (9: 55 sums + 55 differences)."""
    out = []
    for a in range(max_operand + 1):
        for b in range(max_operand + 1):
            if a + b <= 9:
                out.append(Problem(f"{a}+{b}=", str(a + b), f"{a}+{b}"))
            if a - b >= 0:
                out.append(Problem(f"{a}-{b}=", str(a - b), f"{a}-{b}"))
    return out


def warm_start(model, tokenizer, problems: list[Problem], steps: int, batch: int = 32, lr: float = 3e-3,
               seed: int = 0, correct_frac: float = 0.0, logprobs=None, params=None) -> list[float]:
    """Supervised warm start on `\\boxed{r}<eos>` where r is the correct answer with probability `correct_frac`,
    else a random digit: the format, plus (when correct_frac > 0) a weak, noisy hint of the task — like an SFT
    model that is sometimes right. Returns the loss per step. `logprobs(ids [B, T], targets [B, T]) -> [B, T]` and
    `params` replace the model's own forward and parameters (the trainer passes its FSDP2-sharded policy)."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters() if params is None else params, lr=lr, weight_decay=0.0)
    eos = tokenizer.eos_token_id
    losses = []
    model.train()
    for _ in range(steps):
        rows, masks = [], []
        for p in rng.choices(problems, k=batch):
            prompt = tokenizer.encode(p.problem)
            r = p.answer if rng.random() < correct_frac else str(rng.randrange(10))
            target = tokenizer.encode(f"\\boxed{{{r}}}") + [eos]
            rows.append(prompt + target)
            masks.append([0] * len(prompt) + [1] * len(target))
        T = max(map(len, rows))
        dev = model.device
        ids = torch.tensor([r + [eos] * (T - len(r)) for r in rows], device=dev)  # [B, T]
        mask = torch.tensor([m + [0] * (T - len(m)) for m in masks], dtype=torch.bool, device=dev)  # [B, T]
        if logprobs is None:
            logits = model(ids[:, :-1]).logits.float()  # [B, T-1, V]
            loss = torch.nn.functional.cross_entropy(logits[mask[:, 1:]], ids[:, 1:][mask[:, 1:]])
        else:
            loss = -logprobs(ids[:, :-1], ids[:, 1:]).float()[mask[:, 1:]].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def save_toy_checkpoint(path: str, *, max_position_embeddings: int = 1024, seed: int = 0) -> str:
    """A tiny random MoE checkpoint (the `tiny` preset, vocab 128) with the char tokenizer and its chat template
    saved beside it: a real checkpoint directory for the server tests and `dsmath bench serve` on a CPU."""
    from ._pkg import model_module

    torch.manual_seed(seed)
    lm = model_module().MoEForCausalLM.from_config(model_module("presets").preset(
        "tiny", max_position_embeddings=max_position_embeddings))
    lm.save_pretrained(path)
    char_tokenizer(chat_template=True).save_pretrained(path)
    return path
