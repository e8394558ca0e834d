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


def mock_llm(vocab_size: int = 64, seed: int = 4, poison_token: int | None = None, **llm_kwargs):
    """An LLM on engine/mock_model.py with word_tokenizer(vocab_size), picklable by reference (functools.partial),
    so an engine process can build it (AsyncLLM.with_engine_process). poison_token: a step raises
    RuntimeError("boom") while a request whose prompt starts with this token is in the engine (failing steps)."""
    from model.engine import LLM
    from model.engine.mock_model import MockPagedModel

    llm = LLM(MockPagedModel(vocab_size=vocab_size, eos_token_id=None, seed=seed),
              tokenizer=word_tokenizer(vocab_size), **llm_kwargs)
    if poison_token is not None:
        real = llm.compute_step

        def compute_step():
            if any(r.prompt_ids[0] == poison_token for r in llm.requests.values()):
                raise RuntimeError("boom")
            return real()

        llm.compute_step = compute_step
    return llm
