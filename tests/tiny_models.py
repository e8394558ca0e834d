"""Tiny random MoE models for the model and engine tests: weights drawn so routing and argmax are decisive (no
near-ties between two fp32 computation paths) and every layer matters."""

import torch

from model import MoEForCausalLM
from model.presets import preset


@torch.no_grad()
def randomize(model, *, norms: bool = True, weights: bool = True) -> None:
    """In place: norms ~ 1 + 0.1 N, router weights ~ N(0, 0.5), other weights ~ N(0, 0.1) (when `weights`),
    DeepSeek-V3 score-correction biases ~ 0.1 N. Works on our model and on transformers' alike."""
    for name, p in model.named_parameters():
        if "norm" in name:
            if norms:
                p.copy_(1 + 0.1 * torch.randn_like(p))
        elif name.endswith("mlp.gate.weight"):
            p.normal_(0, 0.5)
        elif weights:
            p.normal_(0, 0.1)
    for name, b in model.named_buffers():
        if "e_score_correction_bias" in name:
            b.copy_(0.1 * torch.randn_like(b))


def make_model(name: str, *, norms: bool = True, **overrides) -> MoEForCausalLM:
    """Preset `name` (tiny-v2, tiny-v3, tiny-qwen3) with config overrides, seeded, weights N(0, 0.1), in eval mode."""
    torch.manual_seed(0)
    m = MoEForCausalLM.from_config(preset(name, **overrides), init_std=0.1)
    randomize(m, norms=norms, weights=False)
    return m.eval()


def word_tokenizer(V: int):
    """A word-level tokenizer over "w0".."w{V-2}" plus a special "[EOS]" (id V-1), no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(V - 1)} | {"[EOS]": V - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[EOS]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[EOS]")
