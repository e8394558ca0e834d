"""Incremental detokenization (vLLM's prefix/read offsets) and stop-string search, per sequence.

Decoding token by token breaks multi-byte characters and word-initial spaces; decoding the window
tokens[prefix_offset:] against tokens[prefix_offset:read_offset] and emitting only the difference does not.
"""

from model.engine.sequence import Sequence


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


def final_text(tokenizer, seq: Sequence, stopped_by_string: bool) -> str | None:
    if tokenizer is None:
        return None
    if stopped_by_string:  # seq.text was cut at the stop string when it appeared
        return seq.text
    return tokenizer.decode(seq.completion_ids, skip_special_tokens=True)
