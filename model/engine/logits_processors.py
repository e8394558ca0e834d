"""Logits processors that read a sequence's tokens: bad words, min_tokens, logit_bias and the repetition /
frequency / presence penalties (vLLM's order and meanings). They run before temperature, on the rows that ask
for them only (`SamplingParams.needs_context`); other rows pass through untouched.

- bad_words: a word's last token is banned when the generated tokens end with the word's other tokens
  (a one-token word is always banned). Each word is tokenized as given and, when that tokenizes differently,
  with a leading space (`bad_words_ids`).
- min_tokens: EOS and stop_token_ids are banned while fewer than min_tokens tokens were generated.
- logit_bias: added to the listed tokens' logits.
- repetition_penalty p: logits of tokens seen in the prompt or the output are divided by p when positive and
  multiplied by p when negative; frequency_penalty f and presence_penalty r (OpenAI's): logit -= f * count +
  r * [count > 0], counting the generated tokens only.
Cost: the token lists of those rows are copied to the device each step (O(sequence length) per row).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RowContext:
    """What the processors need about one row beyond its SamplingParams."""
    prompt_ids: list[int]
    output_ids: list[int]
    bad_words: list[list[int]] = field(default_factory=list)   # token ids of each bad word
    stop_ids: list[int] = field(default_factory=list)          # banned while len(output_ids) < min_tokens


def bad_words_ids(tokenizer, words: list[str], vocab_size: int) -> list[list[int]]:
    """Token ids of each bad word, as given and (when it tokenizes to as many tokens, differently) with a leading
    space — how a word usually appears mid-sentence. Words with a token outside the model's vocabulary are
    dropped (the model cannot generate them)."""
    out: list[list[int]] = []
    for w in words:
        plain = list(tokenizer.encode(w.lstrip(), add_special_tokens=False))
        spaced = list(tokenizer.encode(" " + w.lstrip(), add_special_tokens=False))
        for ids in (plain, spaced) if len(spaced) == len(plain) and spaced[:1] != plain[:1] else (plain,):
            if ids and max(ids) < vocab_size and ids not in out:
                out.append(ids)
    return out


def _banned(p, c: RowContext) -> list[int]:
    out = c.output_ids
    ban = [w[-1] for w in c.bad_words if len(w) <= len(out) + 1 and (len(w) == 1 or out[len(out) - len(w) + 1:]
                                                                      == w[:-1])]
    if len(out) < p.min_tokens:
        ban += c.stop_ids
    return ban


def apply_processors(logits: torch.Tensor, params: list, contexts: list[RowContext | None]) -> torch.Tensor:
    """logits [B, V] float32 -> processed logits [B, V] (a new tensor; `logits` itself when no row asks)."""
    rows = [i for i, p in enumerate(params) if p.needs_context]
    if not rows:
        return logits
    x, dev = logits.clone(), logits.device
    r_idx, t_idx, vals = [], [], []                        # additive updates: -inf bans and biases
    for i in rows:
        p, c = params[i], contexts[i]
        for t in _banned(p, c):
            r_idx.append(i), t_idx.append(t), vals.append(float("-inf"))
        for t, b in p.logit_bias.items():
            r_idx.append(i), t_idx.append(t), vals.append(b)
    if r_idx:
        x.index_put_((torch.tensor(r_idx, device=dev), torch.tensor(t_idx, device=dev)),
                     torch.tensor(vals, device=dev), accumulate=True)
    pen = [i for i in rows if params[i].presence_penalty or params[i].frequency_penalty
           or params[i].repetition_penalty != 1.0]
    if pen:
        x[torch.tensor(pen, device=dev)] = _penalize(x[torch.tensor(pen, device=dev)], [params[i] for i in pen],
                                                     [contexts[i] for i in pen])
    return x


def _counts(ids: list[list[int]], V: int, device) -> torch.Tensor:
    """[R, V] float32: how often each token occurs in each row's list."""
    rows = [r for r, lst in enumerate(ids) for _ in lst]
    flat = [t for lst in ids for t in lst]
    out = torch.zeros(len(ids), V, device=device)
    if flat:
        out.index_put_((torch.tensor(rows, device=device), torch.tensor(flat, device=device)),
                       torch.ones(len(flat), device=device), accumulate=True)
    return out


def _penalize(x: torch.Tensor, params: list, contexts: list[RowContext]) -> torch.Tensor:
    """x [R, V] -> penalised [R, V]."""
    R, V = x.shape
    counts = _counts([c.output_ids for c in contexts], V, x.device)            # [R, V]
    rep = torch.tensor([p.repetition_penalty for p in params], device=x.device)[:, None]
    if bool((rep != 1.0).any()):
        seen = (counts > 0) | (_counts([c.prompt_ids for c in contexts], V, x.device) > 0)
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    freq = torch.tensor([p.frequency_penalty for p in params], device=x.device)[:, None]
    pres = torch.tensor([p.presence_penalty for p in params], device=x.device)[:, None]
    return x - freq * counts - pres * (counts > 0).float()
