"""Scheduler: continuous batching with chunked prefill and preemption by recompute.

Each step gets a token budget (max_num_batched_tokens). Running sequences go first, oldest request first:
a decoding sequence costs 1 token, a (re)prefilling one gets a chunk of what budget is left. Then waiting
requests are admitted, oldest first, while budget, sequence slots and free blocks last. So new requests join
between steps and a long prompt is prefilled in chunks alongside ongoing decodes.

When a running sequence cannot get a block, the NEWEST running sequence is preempted: its blocks are freed
and it goes back to the waiting queue with all its tokens, to be prefilled again (recompute). Nothing is lost;
its generator state is kept, so a greedy (or seeded) sample continues where it was.
"""

import bisect
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, Status


def _age(seq: Sequence) -> tuple[int, int]:
    return (seq.request_id, seq.index)  # smaller = older


@dataclass
class Batch:
    seqs: list[Sequence]
    num_new: list[int]                                       # new tokens fed per sequence this step
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst) blocks
    is_decode: bool = False
    all_logits: list[bool] = field(default_factory=list)     # per sequence: logits of EVERY new token (prompt
                                                              #   log-probs), not only the last; empty: none

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 256, max_num_batched_tokens: int = 8192):
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []    # sorted by age
        self.running: list[Sequence] = []    # sorted by age
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        bisect.insort(self.waiting, seq, key=_age)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        batch, budget = Batch([], []), self.max_num_batched_tokens
        preempted = False
        for seq in list(self.running):
            if seq.status != Status.RUNNING:        # preempted earlier in this loop
                continue
            if budget == 0 or len(batch.seqs) >= self.max_num_seqs:
                break
            got = self.bm.allocate(seq, budget)
            while got is None:
                victim = self.running[-1]
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
                got = self.bm.allocate(seq, budget)
            if got is not None:
                budget -= self._take(batch, seq, got)
        if not preempted:
            budget = self._admit(batch, budget)
        batch.is_decode = bool(batch.seqs) and all(k == 1 for k in batch.num_new)
        return batch

    def _admit(self, batch: Batch, budget: int) -> int:
        slots = self.max_num_seqs - sum(s.n_fork for s in self.running)
        while self.waiting and budget > 0 and self.waiting[0].n_fork <= slots:
            seq = self.waiting[0]
            got = self.bm.allocate(seq, budget)
            if got is None:
                break
            self.waiting.pop(0)
            seq.status = Status.RUNNING
            bisect.insort(self.running, seq, key=_age)
            slots -= seq.n_fork
            budget -= self._take(batch, seq, got)
        return budget

    @staticmethod
    def _take(batch: Batch, seq: Sequence, got: tuple[int, list]) -> int:
        num_new, copies = got
        batch.seqs.append(seq)
        batch.num_new.append(num_new)
        batch.copies.extend(copies)
        return num_new

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free_seq(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    def fork(self, children: list[Sequence]) -> None:
        for child in children:
            self.bm.fork(child)
            child.status = Status.RUNNING
            bisect.insort(self.running, child, key=_age)

    def abort(self, seq: Sequence) -> None:
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
            self.bm.free_seq(seq)
        elif seq.status == Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        self.running.remove(seq)
        self.bm.free_seq(seq)
