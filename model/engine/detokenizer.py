"""Incremental detokenization (vLLM's prefix/read offsets) and stop-string search, per sequence.

Decoding token by token breaks multi-byte characters and word-initial spaces; decoding the window
tokens[prefix_offset:] against tokens[prefix_offset:read_offset] and emitting only the difference does not.
"""

from .sequence import Sequence


def _decode(tokenizer, ids: list[int], params) -> str:
    """tokenizer.decode(ids), straight through the Rust tokenizer where that gives the same text (a fast
    tokenizer without clean-up of tokenization spaces): transformers' Python wrapper around it cost as much as
    the tiny model's forward per streamed token (measured: incremental detokenization +15-40 % CPU)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return backend.decode(ids, skip_special_tokens=params.skip_special_tokens)
    kw = {"skip_special_tokens": params.skip_special_tokens}
    if not params.spaces_between_special_tokens:  # the tokenizers' default is True; slow tokenizers read it
        kw["spaces_between_special_tokens"] = False
    return tokenizer.decode(ids, **kw)


def decode_step(tokenizer, seq: Sequence) -> str:
    """Append the text completed by seq's newest token(s) to seq.text; returns that new text."""
    ids, p = seq.token_ids, seq.params
    before = _decode(tokenizer, ids[seq.prefix_offset:seq.read_offset], p)
    after = _decode(tokenizer, ids[seq.prefix_offset:], p)
    if len(after) <= len(before) or after.endswith("\ufffd"):  # incomplete character: wait for more tokens
        return ""
    new = after[len(before):]
    seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
    seq.text += new
    return new


def first_stop(text: str, stops: list[str], start: int = 0) -> tuple[int, str | None]:
    """(index, stop string) of the earliest stop string in text[start:], or (-1, None)."""
    hits = [(i, s) for s, i in ((s, text.find(s, start)) for s in stops) if i >= 0]
    return min(hits) if hits else (-1, None)


def find_stop(text: str, new: str, stops: list[str]) -> tuple[int, str | None]:
    """(index, stop string) of the earliest stop string that the newest piece `new` completed, or (-1, None)."""
    if not new:
        return -1, None
    return first_stop(text, stops, max(0, len(text) - len(new) - max(len(s) for s in stops) + 1))


def stop_cut(i: int, stop: str, params) -> int:
    """Where the text ends when stop string `stop` was found at i (after it with include_stop_str_in_output)."""
    return i + len(stop) if params.include_stop_str_in_output else i


def final_text(tokenizer, seq: Sequence, stops: list[str]) -> str | None:
    """The completion's text as the incremental decoder sees it (decoded after a few prompt tokens, so a
    leading space is kept, as vLLM does), cut at the earliest stop string when one ended the sequence."""
    p = seq.params
    if tokenizer is None or not p.detokenize:
        return None
    ctx = seq.token_ids[max(0, seq.num_prompt_tokens - 5):seq.num_prompt_tokens]
    head = _decode(tokenizer, ctx, p)
    full = _decode(tokenizer, ctx + seq.completion_ids, p)
    text = full[len(head):] if full.startswith(head) else _decode(tokenizer, seq.completion_ids, p)
    if seq.stopped_by_string:
        i, s = first_stop(text, stops)
        text = text[:stop_cut(i, s, p)] if s is not None else seq.text
    return text
