"""The mbarrier protocol of attention8_gluon's ping-pong kernel, played out in Python (no GPU, no Triton).

A hang on the device costs the whole device call, so the protocol `_attn_fwd_pingpong`'s docstring states
is checked here on a model: mbarriers with PTX's phase semantics (a fresh barrier's parity-1 phase counts
as complete; expect adds an arrival and transaction bytes), TMA copies that land at random later times,
and the three partitions (`_pp_load`, `_pp_consume` with and without OVERLAP and PINGPONG) as generators
of the same waits and arrivals in the same order, run by a random scheduler. Checked: every schedule
finishes; a consumer only reads a stage holding the block it expects and no copy overwrites a stage a
consumer is still reading; with PINGPONG the consumers' wgmma groups alternate 0, 1, 0, 1, ...

This models the kernel's source, so it catches a wrong parity, count or order in that source as long as
the model is kept in step with it (the GPU tests check the kernel itself).
"""

import random

import pytest


class Barrier:
    def __init__(self, count):
        self.count, self.pending, self.tx, self.phase = count, count, 0, 0

    def passes(self, parity):  # mbarrier.try_wait.parity: the phase of this parity has completed
        return (self.phase & 1) != parity

    def arrive(self, tx=0):
        self.pending -= 1
        self.tx += tx
        self._maybe_complete()

    def land(self, nbytes):
        self.tx -= nbytes
        self._maybe_complete()

    def _maybe_complete(self):
        assert self.pending >= 0, "more arrivals than the count"
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.count


def producer(n, stages, st):
    for c in range(2):
        yield ("expect", st.q_bars[c], 1)
        yield ("tma", st.q_bars[c], ("q", c), 1)
    for j in range(n):
        s = j % stages
        free = ((j // stages) & 1) ^ 1
        for kind, empty, full in (("k", st.k_empty, st.k_full), ("v", st.v_empty, st.v_full)):
            yield ("wait", empty[s], free)
            yield ("expect", full[s], 1)
            yield ("tma", full[s], (kind, s, j), 1)


def consumer(c, n, stages, st, pingpong, overlap):
    def turn(k, on=True):
        if pingpong and on:
            yield ("wait", st.turn[c], (k & 1) ^ (1 - c))

    def pass_(on=True):
        if pingpong and on:
            yield ("arrive", st.turn[1 - c])

    def read(kind, j):  # wait for block j's tile, mark it being read
        s = j % stages
        full = st.k_full if kind == "k" else st.v_full
        yield ("wait", full[s], (j // stages) & 1)
        yield ("read", (kind, s, j), c)

    def release(kind, j):
        s = j % stages
        yield ("done", (kind, s, j), c)
        yield ("arrive", (st.k_empty if kind == "k" else st.v_empty)[s])

    yield ("wait", st.q_bars[c], 0)
    yield from read("k", 0)
    yield from turn(0)
    yield ("issue", c, 0)
    yield from pass_()
    yield from release("k", 0)
    for j in range(n - 1):
        if overlap:  # _pp_overlapped_block
            yield from read("k", j + 1)
            yield from turn(j + 1)
            yield ("issue", c, j + 1)
            yield from pass_()
            yield from read("v", j)  # after the softmax
            yield from release("k", j + 1)
            yield from release("v", j)
        else:
            yield from read("v", j)
            yield from read("k", j + 1)
            yield from turn(j + 1)
            yield ("issue", c, j + 1)
            yield from pass_()
            yield from release("v", j)
            yield from release("k", j + 1)
    yield from read("v", n - 1)
    yield from turn(n, not overlap)
    if not overlap:
        yield ("issue", c, n)
    yield from pass_(not overlap)
    yield from release("v", n - 1)


class State:
    def __init__(self, stages):
        self.q_bars = [Barrier(1) for _ in range(2)]
        self.turn = [Barrier(1) for _ in range(2)]
        self.k_full = [Barrier(1) for _ in range(stages)]
        self.v_full = [Barrier(1) for _ in range(stages)]
        self.k_empty = [Barrier(2) for _ in range(stages)]
        self.v_empty = [Barrier(2) for _ in range(stages)]


def play(n, stages, pingpong, overlap, rng):
    """Run one random schedule; returns the order of wgmma issue groups [(consumer, group), ...]."""
    st = State(stages)
    parts = {"p": producer(n, stages, st), 0: consumer(0, n, stages, st, pingpong, overlap),
             1: consumer(1, n, stages, st, pingpong, overlap)}
    nxt = {name: next(g) for name, g in parts.items()}
    in_flight, stage_holds, readers, issues = [], {}, {}, []
    while nxt or in_flight:
        runnable = [name for name, op in nxt.items() if op[0] != "wait" or op[1].passes(op[2])]
        choices = runnable + (["tma"] if in_flight else [])
        assert choices, f"deadlock: n={n} stages={stages} waiting: {nxt}"
        pick = rng.choice(choices)
        if pick == "tma":  # one copy lands
            bar, tile, nbytes = in_flight.pop(rng.randrange(len(in_flight)))
            if tile[0] != "q":
                kind, s, j = tile
                assert not readers.get((kind, s)), f"block {j} overwrites {kind} stage {s} while it is read"
                stage_holds[kind, s] = j
            bar.land(nbytes)
            continue
        op = nxt[pick]
        if op[0] == "expect":
            op[1].arrive(tx=op[2])
        elif op[0] == "tma":
            in_flight.append((op[1], op[2], op[3]))
        elif op[0] == "arrive":
            op[1].arrive()
        elif op[0] == "read":
            kind, s, j = op[1]
            assert stage_holds.get((kind, s)) == j, f"consumer {op[2]} reads {kind} stage {s} expecting block {j}"
            readers.setdefault((kind, s), set()).add(op[2])
        elif op[0] == "done":
            kind, s, j = op[1]
            readers[kind, s].discard(op[2])
        elif op[0] == "issue":
            issues.append((op[1], op[2]))
        try:
            nxt[pick] = next(parts[pick])
        except StopIteration:
            del nxt[pick]
    return issues


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("pingpong", [True, False])
@pytest.mark.parametrize("stages", [2, 3, 4])
def test_every_schedule_finishes_reads_the_right_tiles_and_alternates(stages, pingpong, overlap):
    rng = random.Random(stages * 100 + pingpong * 10 + overlap)
    for n in (1, 2, 3, 4, 5, 7, 12):
        for _ in range(60):
            issues = play(n, stages, pingpong, overlap, rng)
            groups = n if overlap else n + 1
            assert sorted(issues) == sorted((c, k) for c in range(2) for k in range(groups))
            if pingpong:
                assert issues == [(c, k) for k in range(groups) for c in range(2)]


def test_the_model_catches_a_wrong_parity():
    """A producer that waits the wrong parity on the empty barriers overwrites a stage still being read
    (or deadlocks): the model is not vacuous."""
    global producer
    right = producer

    def wrong(n, stages, st):
        for op in right(n, stages, st):
            yield ("wait", op[1], op[2] ^ 1) if op[0] == "wait" else op

    producer = wrong
    try:
        with pytest.raises(AssertionError):
            for seed in range(50):
                play(5, 2, True, False, random.Random(seed))
    finally:
        producer = right
