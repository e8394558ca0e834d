"""Per-step metadata the engine hands to `MoEForCausalLM.forward_paged` (contract: model/README.md).

One engine step is a flat batch of N new tokens from B sequences; the paged KV cache is addressed through
block tables and slot mappings, so the model never sees per-call Python lists.
"""
from dataclasses import dataclass

import torch


@dataclass
class ForwardMeta:                 # one engine step: a flat batch of new tokens from B sequences
    input_ids: torch.Tensor        # [N] int64  new tokens of all sequences, concatenated
    positions: torch.Tensor        # [N] int64  absolute position of each new token
    cu_seqlens_q: torch.Tensor     # [B+1] int32  prefix sums of new tokens per sequence
    seq_lens: torch.Tensor         # [B] int32  tokens in the cache for each sequence AFTER this step
    block_tables: torch.Tensor     # [B, max_blocks] int32 (unused entries -1 or 0; only the first
                                   #   ceil(seq_lens/block_size) are read)
    slot_mapping: torch.Tensor     # [N] int64  cache slot (block * block_size + offset) of each new token
    logits_indices: torch.Tensor   # [M] int64  tokens (of the N) whose logits are returned: each sequence's last new
                                   #   token, and every new token of sequences asking for prompt log-probs
    is_decode: bool                # every sequence has exactly one new token -> paged_decode / mla_decode
    decode_plan: object = None     # optional plan from dsmath_kernels.plan_decode, reused by every layer
    max_seqlen_q: int | None = None  # optional host int: max new tokens of one sequence (prefill steps); when
                                     #   None, forward_paged reads it from cu_seqlens_q once per step (one sync)
    cascade: object = None         # optional dsmath_kernels.SharedPrefix (decode steps): rows sharing prompt
                                   #   blocks, whose shared blocks attention reads once per group
