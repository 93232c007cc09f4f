"""The block manager and the iteration-level scheduler, as pure logic (no model)."""
from __future__ import annotations

import random

import pytest

from msmartcompute.runtime.generation.blocks import BlockManager
from msmartcompute.runtime.generation.scheduler import Scheduler, Sequence


def test_blocks_grow_free_and_slots():
    bm = BlockManager(num_blocks=4, block_size=4)
    assert bm.grow("a", 5) and bm.tables["a"] == [0, 1]
    assert bm.grow("b", 4) and bm.tables["b"] == [2]
    assert bm.free_blocks == 1 and bm.used_blocks == 3
    assert bm.slots("a", 3, 6) == [3, 4, 5]
    assert not bm.grow("b", 9) and bm.tables["b"] == [2] and bm.free_blocks == 1  # all or nothing
    assert bm.grow("a", 8) and bm.free_blocks == 1                                  # already covered
    assert bm.free("a") == 2 and bm.free_blocks == 3
    assert bm.grow("c", 12) and sorted(bm.tables["c"]) == [0, 1, 3]
    with pytest.raises(ValueError):
        BlockManager(0, 16)


def run_to_end(sched: Scheduler, max_tokens: dict, max_steps: int = 10_000):
    """Drive the scheduler as the worker does, sampling token 7 each time; returns the plans."""
    plans = []
    for _ in range(max_steps):
        if not sched.has_work():
            return plans
        plan = sched.schedule()
        assert plan, "work left but nothing scheduled"
        assert sum(c.count for c in plan) <= sched.max_step_tokens
        assert len({id(c.seq) for c in plan}) == len(plan)
        for c in plan:  # every chunk's tokens have slots in the sequence's blocks
            assert sched.blocks.missing(c.seq.seq_id, c.start + c.count) == 0
        sched.computed(plan)
        for c in plan:
            if c.samples:
                c.seq.output.append(7)
                if len(c.seq.output) == max_tokens[c.seq.seq_id]:
                    sched.finish(c.seq)
        plans.append(plan)
    raise AssertionError("did not finish")


def test_decodes_first_then_chunked_prefill_within_the_step_budget():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_running=8, max_step_tokens=10)
    a = Sequence(list(range(3)))
    sched.add(a)
    plan = sched.schedule()
    assert [(c.seq, c.start, c.count, c.samples) for c in plan] == [(a, 0, 3, True)]
    sched.computed(plan)
    a.output.append(1)
    long = Sequence(list(range(25)))
    sched.add(long)
    plan = sched.schedule()  # a's decode first, then 9 tokens of the long prompt
    assert [(c.seq, c.start, c.count, c.samples) for c in plan] == [(a, 3, 1, True), (long, 0, 9, False)]
    sched.computed(plan)
    a.output.append(1)
    plan = sched.schedule()
    assert [(c.seq, c.start, c.count) for c in plan] == [(a, 4, 1), (long, 9, 9)]


def test_admission_waits_for_free_blocks_and_max_running():
    bm = BlockManager(4, 4)  # 16 token slots
    sched = Scheduler(bm, max_running=2, max_step_tokens=100)
    seqs = [Sequence(list(range(6))) for _ in range(3)]  # each needs 2 blocks (6 tokens + 1)
    for s in seqs:
        sched.add(s)
    plan = sched.schedule()
    assert [c.seq for c in plan] == seqs[:2] and list(sched.waiting) == [seqs[2]]
    with pytest.raises(ValueError):
        sched.add(Sequence(list(range(16))))  # can never fit: refused, not left to wait forever


def test_preempts_the_newest_when_blocks_run_out_and_recomputes_it():
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, max_running=4, max_step_tokens=100)
    old, new = Sequence([1, 2, 3]), Sequence([4, 5, 6])
    sched.add(old)
    sched.add(new)
    want = {old.seq_id: 9, new.seq_id: 9}  # 3 + 9 = 12 tokens: 3 blocks each, 6 > 4 in the pool
    plans = run_to_end(sched, want)
    assert new.preemptions >= 1 and old.preemptions == 0
    assert old.output == [7] * 9 and new.output == [7] * 9
    assert bm.free_blocks == 4 and not bm.tables
    # the preempted sequence was prefilled again from its first token, output included
    recompute = [c for p in plans for c in p if c.seq is new and c.start == 0]
    assert len(recompute) == 1 + new.preemptions and recompute[-1].count > len(new.prompt)


def test_random_workloads_finish_and_free_every_block():
    rng = random.Random(0)
    for trial in range(30):
        bm = BlockManager(rng.randint(8, 40), rng.choice([1, 2, 4, 16]))
        sched = Scheduler(bm, max_running=rng.randint(1, 6), max_step_tokens=rng.randint(1, 64))
        want = {}
        for _ in range(rng.randint(1, 12)):
            room = bm.num_blocks * bm.block_size
            prompt = rng.randint(1, max(1, min(40, room // 2)))
            s = Sequence(list(range(prompt)))
            want[s.seq_id] = rng.randint(1, max(1, room - prompt - 1 - bm.block_size))
            if bm.blocks_for(prompt + want[s.seq_id] + 1) > bm.num_blocks:
                continue
            sched.add(s)
        run_to_end(sched, want)
        assert bm.free_blocks == bm.num_blocks and not sched.running and not sched.waiting
