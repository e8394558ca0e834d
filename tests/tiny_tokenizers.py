"""Character-level tokenizers shaped like real chat models' (built offline with `tokenizers`, < 128 ids so the tiny
model presets can run them):

- `deepseek_style_tokenizer()`: as DeepSeek-V2/V3/R1's — encoding adds BOS (`add_bos_token` on: a post-processor
  puts `<｜begin▁of▁sentence｜>` first) AND the chat template begins with `{{ bos_token }}`, so a rendered chat
  prompt encoded with special tokens holds two BOS.
- `qwen_style_tokenizer()`: as Qwen2.5/Qwen3's — no BOS anywhere, `<|im_start|>role ... <|im_end|>` turns, and
  the Qwen3 `enable_thinking=False` switch (an empty think block after the assistant header).
"""

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

DS_BOS, DS_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
DS_USER, DS_ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
DEEPSEEK_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _chars(specials: list[str], bos: str | None):
    vocab = {t: i for i, t in enumerate(specials + ["<unk>", "\n"] + [chr(c) for c in range(32, 127)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one piece per character
    tk.decoder = decoders.Fuse()
    if bos is not None:  # add_bos_token: every encode starts with BOS
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, vocab[bos])])
    return tk


def deepseek_style_tokenizer() -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_object=_chars([DS_BOS, DS_EOS, DS_USER, DS_ASSISTANT], DS_BOS),
                                  bos_token=DS_BOS, eos_token=DS_EOS, pad_token=DS_EOS, unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": [DS_USER, DS_ASSISTANT]})
    tok.chat_template = DEEPSEEK_TEMPLATE
    return tok


def qwen_style_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = PreTrainedTokenizerFast(tokenizer_object=_chars(specials, None), eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    tok.chat_template = QWEN_TEMPLATE
    return tok
