"""Triton varlen prefill against the paged KV cache (work in progress: kernel lands in the next commit)."""

from __future__ import annotations


def available() -> bool:
    return False


def paged_prefill_triton(*args, **kwargs):
    raise NotImplementedError("paged_prefill_triton: not built yet")
