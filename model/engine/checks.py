"""Argument checks shared by SamplingParams, LLM and the server: each raises TypeError (wrong type) or ValueError
(wrong value) naming the argument, never a raw error from deep inside the engine."""

from __future__ import annotations

import math
import numbers


class RequestError(ValueError):
    """One request cannot be served (prompt too long, n too large, token id outside the vocabulary, ...).
    `LLM.add_request` raises it; `LLM.generate` turns it into that request's output (finish_reason="error")
    and serves the rest of the batch; the server answers HTTP 400."""


def is_int(v) -> bool:
    return type(v) is int or (isinstance(v, numbers.Integral) and not isinstance(v, bool))   # int: the fast path


def check_int(name: str, v, lo: int | None = None, hi: int | None = None, *, none: bool = False) -> int | None:
    if v is None and none:
        return None
    if not is_int(v):
        raise TypeError(f"{name}: expected an int{' or None' if none else ''}, got {type(v).__name__} {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name}: must be {rng}, got {v}")
    return int(v)


def check_float(name: str, v, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> float:
    if type(v) is not float and (not isinstance(v, numbers.Real) or isinstance(v, bool)):
        raise TypeError(f"{name}: expected a number, got {type(v).__name__} {v!r}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name}: must be finite, got {v}")
    if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
        left = "(" if lo_open else "["
        raise ValueError(f"{name}: must be in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}], "
                         f"got {v}")
    return v


def check_bool(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name}: expected True or False, got {type(v).__name__} {v!r}")
    return v


def check_token_ids(name: str, ids) -> list[int]:
    """A list of ints (a float such as 1.7 is refused, never truncated)."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise TypeError(f"{name}: expected a list of token ids (ints), got {type(ids).__name__} {ids!r}")
    out = list(ids)
    for t in out:
        if not is_int(t):
            raise TypeError(f"{name}: token ids must be ints, got {type(t).__name__} {t!r}")
    return [int(t) for t in out]
