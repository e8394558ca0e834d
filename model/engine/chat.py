"""Chat prompts: a conversation rendered with the tokenizer's chat template (or a given one) and tokenized once.

The template writes the special tokens it wants (BOS included), so the rendered text is encoded with
add_special_tokens=False: one BOS, never two. Used by `LLM.chat` and the server's /v1/chat/completions.
"""

from __future__ import annotations

import os

ROLES = ("system", "user", "assistant", "tool", "developer")


def _content(msg: dict, name: str) -> str:
    """A message's content as text: a string, None, or a list of {"type": "text", "text": ...} parts."""
    c = msg.get("content")
    if c is None or isinstance(c, str):
        return c or ""
    if isinstance(c, list):
        texts = []
        for part in c:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError(f"{name}.content: only text parts ({{'type': 'text', 'text': ...}}) are "
                                 f"supported, got {part!r}"[:300])
            texts.append(part["text"])
        return "\n".join(texts)
    raise TypeError(f"{name}.content: expected a string or a list of text parts, got {type(c).__name__}")


def normalize_conversation(conversation, name: str = "messages") -> list[dict]:
    """[{"role", "content", ...}] with string contents; checks roles and types, naming the bad message."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise TypeError(f"{name}: expected a non-empty list of message dicts, got {conversation!r}"[:300])
    out = []
    for i, msg in enumerate(conversation):
        where = f"{name}[{i}]"
        if not isinstance(msg, dict):
            raise TypeError(f"{where}: expected a dict with 'role' and 'content', got {type(msg).__name__}")
        if msg.get("role") not in ROLES:
            raise ValueError(f"{where}.role: must be one of {ROLES}, got {msg.get('role')!r}")
        out.append({**msg, "content": _content(msg, where)})
    return out


def load_chat_template(template: str | None) -> str | None:
    """A Jinja template given inline or as a path to a file holding one."""
    if template is not None and len(template) < 4096 and os.path.isfile(template):
        with open(template) as f:
            return f.read()
    return template


def render_chat(tokenizer, conversation, *, chat_template: str | None = None, add_generation_prompt: bool = True,
                continue_final_message: bool = False, chat_template_kwargs: dict | None = None,
                name: str = "messages") -> tuple[str, list[int]]:
    """conversation -> (prompt text, token ids), tokenized once without extra special tokens."""
    if tokenizer is None:
        raise ValueError("chat: needs a tokenizer (LLM(..., tokenizer=...))")
    conv = normalize_conversation(conversation, name)
    template = load_chat_template(chat_template)
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_template: the tokenizer has no chat template; pass chat_template= (a Jinja string "
                         "or a file)")
    if add_generation_prompt and continue_final_message:
        raise ValueError("continue_final_message: cannot be combined with add_generation_prompt=True")
    kwargs = dict(chat_template_kwargs or {})
    text = tokenizer.apply_chat_template(conv, tokenize=False, chat_template=template,
                                         add_generation_prompt=add_generation_prompt,
                                         continue_final_message=continue_final_message, **kwargs)
    return text, list(tokenizer.encode(text, add_special_tokens=False))
