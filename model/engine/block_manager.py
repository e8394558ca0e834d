"""BlockManager: reference-counted KV-cache blocks, shared prompts, copy-on-write, optional prefix caching.

The cache is `num_blocks` blocks of `block_size` token slots. A sequence's block_table lists its blocks in
order; token p lives in slot block_table[p // block_size] * block_size + p % block_size.
- fork: the n samples of a prompt share all its blocks (ref count n); the prompt is prefilled once.
- copy-on-write: before a sequence writes into a block others still reference (the last, partial prompt
  block after a fork), it gets a fresh block and the engine copies the shared one into it (returned as
  (src, dst) pairs by `allocate`).
- prefix caching (optional): every full, computed block is hashed by (hash of the blocks before it, its
  tokens); a new sequence whose leading blocks match reuses them instead of recomputing. Freed blocks keep
  their hash until they are handed out again (least recently freed first).
"""

from collections import OrderedDict

from .sequence import Sequence


class Block:
    __slots__ = ("hash", "id", "ref", "tokens")

    def __init__(self, block_id: int):
        self.id = block_id
        self.ref = 0
        self.hash: int | None = None
        self.tokens: tuple[int, ...] | None = None


def block_hash(prev: int | None, tokens: tuple[int, ...]) -> int:
    return hash((prev, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.prefix_caching = enable_prefix_caching
        self.cached: dict[int, int] = {}     # block hash -> block id (full, computed blocks)
        self.num_prefix_hits = 0             # blocks reused from the prefix cache (for stats/tests)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- allocation -------------------------------------------------------------------------------------
    def _match_prefix(self, seq: Sequence) -> list[int]:
        """Cached block ids matching seq's leading full blocks (always leaves >= 1 token to compute)."""
        if not self.prefix_caching or seq.block_table or seq.num_computed:
            return []
        if seq.params.prompt_logprobs is not None:  # cached blocks would skip the prompt positions' logits
            return []
        bs, prev, hits = self.block_size, None, []
        for i in range((len(seq) - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = block_hash(prev, tokens)
            bid = self.cached.get(h)
            if bid is None or self.blocks[bid].tokens != tokens:
                break
            hits.append(bid)
            prev = h
        return hits

    def _take_free(self) -> int:
        bid, _ = self.free.popitem(last=False)
        block = self.blocks[bid]
        if block.hash is not None and self.cached.get(block.hash) == bid:
            del self.cached[block.hash]
        block.hash, block.tokens, block.ref = None, None, 1
        return bid

    def allocate(self, seq: Sequence, budget: int) -> tuple[int, list[tuple[int, int]]] | None:
        """Reserve blocks for seq's next chunk of at most `budget` pending tokens.

        Returns (number of tokens scheduled, copy-on-write (src, dst) block pairs), or None (nothing
        changed) when there are not enough free blocks.
        """
        bs, table, done = self.block_size, seq.block_table, seq.num_computed
        num_new = min(len(seq) - done, budget)
        if done + num_new <= len(table) * bs and self.blocks[table[done // bs]].ref == 1:
            return num_new, []                       # fast path (most decode steps): room in an owned block
        hits = self._match_prefix(seq)
        computed = seq.num_computed + len(hits) * self.block_size
        num_new = min(len(seq) - computed, budget)
        table_len = len(seq.block_table) + len(hits)
        first = computed // self.block_size  # block receiving the first new token
        cow = first < len(seq.block_table) and self.blocks[seq.block_table[first]].ref > 1
        fresh = int(cow) + max(0, self.blocks_for(computed + num_new) - table_len)
        free_hits = sum(1 for b in hits if self.blocks[b].ref == 0)
        if fresh + free_hits > self.num_free:
            return None
        for bid in hits:
            block = self.blocks[bid]
            if block.ref == 0:
                del self.free[bid]
            block.ref += 1
            seq.block_table.append(bid)
            seq.block_hashes.append(block.hash)
        self.num_prefix_hits += len(hits)
        seq.num_computed = computed
        copies = []
        if cow:
            src = seq.block_table[first]
            self.blocks[src].ref -= 1
            seq.block_table[first] = self._take_free()
            copies.append((src, seq.block_table[first]))
        while len(seq.block_table) < self.blocks_for(computed + num_new):
            seq.block_table.append(self._take_free())
        return num_new, copies

    # ---- sharing and release ----------------------------------------------------------------------------
    def fork(self, child: Sequence) -> None:
        """child was made by Sequence.fork (a copy of the parent's table): count its references."""
        for bid in child.block_table:
            self.blocks[bid].ref += 1

    def free_seq(self, seq: Sequence) -> None:
        for bid in reversed(seq.block_table):  # leading blocks freed last -> evicted last
            block = self.blocks[bid]
            block.ref -= 1
            assert block.ref >= 0, f"block {bid} freed twice"
            if block.ref == 0:
                self.free[bid] = None
        seq.block_table, seq.block_hashes = [], []
        seq.num_computed = 0

    def seal(self, seq: Sequence) -> None:
        """Register seq's newly full, computed blocks in the prefix cache."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed // bs):
            prev = seq.block_hashes[-1] if seq.block_hashes else None
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = block_hash(prev, tokens)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash, block.tokens = h, tokens
                self.cached[h] = block.id
            seq.block_hashes.append(h)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block hash (e.g. after the weights changed: cached K/V are stale)."""
        self.cached.clear()
        for block in self.blocks:
            block.hash, block.tokens = None, None

    def check_all_free(self) -> bool:
        return self.num_free == self.num_blocks and all(b.ref == 0 for b in self.blocks)
