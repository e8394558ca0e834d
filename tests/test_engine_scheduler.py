"""Scheduler: continuous batching, chunked prefill under a token budget, preemption of the newest sequence."""

from model.engine.block_manager import BlockManager
from model.engine.sampling_params import SamplingParams
from model.engine.scheduler import Scheduler
from model.engine.sequence import Sequence, Status


def make(rid: int, n_tokens: int, n: int = 1) -> Sequence:
    return Sequence(rid, list(range(1, n_tokens + 1)), SamplingParams(n=n))


def run_step(sched: Scheduler, sample: bool = True):
    """Schedule, then do what the engine does after the forward: mark computed and append a token."""
    batch = sched.schedule()
    for s, k in zip(batch.seqs, batch.num_new):
        s.num_computed += k
        if sample and s.num_computed == len(s):
            s.token_ids.append(0)
    return batch


def test_chunked_prefill_alongside_decodes():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=6)
    a = make(0, 3)
    sched.add(a)
    b1 = run_step(sched)
    assert b1.seqs == [a] and b1.num_new == [3] and not b1.is_decode
    b = make(1, 10)                              # a long prompt joins between steps
    sched.add(b)
    b2 = run_step(sched)
    assert b2.seqs == [a, b] and b2.num_new == [1, 5]   # decode first, then a 5-token chunk
    b3 = run_step(sched)
    assert b3.num_new == [1, 5] and len(b) == 11        # b's prefill done: sampled its first token
    b4 = run_step(sched)
    assert b4.seqs == [a, b] and b4.num_new == [1, 1] and b4.is_decode


def test_admission_respects_slots_and_order():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=3, max_num_batched_tokens=100)
    seqs = [make(i, 2, n=2 if i == 0 else 1) for i in range(4)]
    for s in reversed(seqs):                     # added out of order: admitted by age
        sched.add(s)
    batch = run_step(sched)
    assert batch.seqs == seqs[:2]                # request 0 reserves 2 slots (n=2), request 1 the third
    assert [s.status for s in seqs] == [Status.RUNNING] * 2 + [Status.WAITING] * 2


def test_preempts_newest_and_recomputes():
    bm = BlockManager(4, 2)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    old, new = make(0, 3), make(1, 3)            # 2 blocks each: the cache is full after admission
    sched.add(old)
    sched.add(new)
    run_step(sched)
    assert bm.num_free == 0 and len(old) == len(new) == 4
    run_step(sched)                               # 5th tokens: both fit in their second block
    batch = run_step(sched)                       # old needs a 3rd block -> new is preempted
    assert batch.seqs == [old] and sched.num_preemptions == 1
    assert new.status == Status.WAITING and new.block_table == [] and new.num_computed == 0
    assert len(new) == 5 and new.token_ids[:3] == [1, 2, 3]   # its generated tokens are kept
    sched.finish(old)
    batch = run_step(sched)                       # new is prefilled again, all 5 tokens
    assert batch.seqs == [new] and batch.num_new == [5]
    sched.finish(new)
    assert bm.check_all_free() and not sched.has_unfinished()


def test_preempts_itself_when_it_is_the_newest():
    bm = BlockManager(3, 2)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = make(0, 4), make(1, 2)
    sched.add(a)
    sched.add(b)
    run_step(sched)                               # a: 2 blocks, b: 1 block, cache full
    batch = run_step(sched)                       # a (5th token) needs a block: b preempted; b waits
    assert batch.seqs == [a] and b.status == Status.WAITING
    run_step(sched)                               # b is not re-admitted while a holds the cache
    assert b.status == Status.WAITING


def test_budget_limits_decodes():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=8)
    seqs = [make(i, 1) for i in range(8)]
    for s in seqs:
        sched.add(s)
    run_step(sched)
    batch = run_step(sched)
    assert len(batch.seqs) == 8 and batch.is_decode and batch.num_tokens == 8
