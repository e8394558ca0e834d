"""Incremental detokenization (vLLM's prefix/read offsets) and stop-string search, per sequence.

Decoding token by token breaks multi-byte characters and word-initial spaces; decoding the window
tokens[prefix_offset:] against tokens[prefix_offset:read_offset] and emitting only the difference does not.
"""

from .sequence import Sequence


def decode_step(tokenizer, seq: Sequence) -> str:
    """Append the text completed by seq's newest token(s) to seq.text; returns that new text."""
    ids = seq.token_ids
    before = tokenizer.decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=True)
    after = tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=True)
    if len(after) <= len(before) or after.endswith("\ufffd"):  # incomplete character: wait for more tokens
        return ""
    new = after[len(before):]
    seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
    seq.text += new
    return new


def find_stop(text: str, new: str, stops: list[str]) -> int:
    """Index in text where the earliest stop string that the newest piece `new` completed starts, or -1."""
    if not new:
        return -1
    start = max(0, len(text) - len(new) - max(len(s) for s in stops) + 1)
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def final_text(tokenizer, seq: Sequence, stops: list[str]) -> str | None:
    """The completion's text as the incremental decoder sees it (decoded after a few prompt tokens, so a
    leading space is kept, as vLLM does), cut at the earliest stop string when one ended the sequence."""
    if tokenizer is None:
        return None
    ctx = seq.token_ids[max(0, seq.num_prompt_tokens - 5):seq.num_prompt_tokens]
    head = tokenizer.decode(ctx, skip_special_tokens=True)
    full = tokenizer.decode(ctx + seq.completion_ids, skip_special_tokens=True)
    text = full[len(head):] if full.startswith(head) else tokenizer.decode(seq.completion_ids,
                                                                            skip_special_tokens=True)
    if seq.stopped_by_string:
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        text = text[:min(hits)] if hits else seq.text
    return text
