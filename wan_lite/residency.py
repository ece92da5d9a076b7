"""Where the experts' weights live: VRAM slots, pinned host RAM or the memory-mapped checkpoint.

The model is cut into units: `embed` (patch, text and time embeddings), `blocks.0` ... `blocks.N-1`,
and `head`. Each unit of each expert is one flat byte buffer on the host (`HostExpert`), laid out by a
`Layout` that both experts share, so moving a unit to the GPU is one copy of one buffer. On the
device sits one skeleton `WanModel` whose tensors are views into device *slots*:

- resident: one slot per unit, one expert's worth of VRAM. The other expert waits on the host. The
  switch does not stall the loop: during the last call of the high-noise expert, as soon as a unit
  has run for the last time (after the uncond pass), the low-noise expert's copy of that unit is
  sent into the same slot on a side CUDA stream. By the time the first low-noise pass reaches a
  block, its weights have been there for a whole pass.
- streaming: the blocks share `slots` (default 2) buffers and cycle through them: when block i is
  done, block i + slots is copied into its slot while blocks i+1 ... run. Classifier-free guidance
  runs block-major (cond and uncond through block i before block i+1 arrives), so each block
  crosses the bus once per step; `cfg_batched` runs the two as one batch of 2, else one after the
  other per block.

Both modes are one rule over the *use sequence* (every unit in the order the calls will use it,
known from `plan_steps`): after a unit's last use before its slot is next needed by another
(expert, unit), send that one into the slot (`next_occupant`). Without a plan the residency assumes
each call repeats the last one, and a call that finds the wrong weights in a slot copies them then
(a visible stall, counted in `stats`). On the CPU the copies are plain and synchronous, so the same
code runs the tests.

Contract with `pipeline.sample`: pass `residency.high` and `residency.low` as the experts. They are
callable as `model(x, t, context)` and also offer `.guided(x, t, context, context_null, scale)`,
the CFG velocity in float32 from one call (batched or block-major). Call `residency.prepare(sampling)`
before the loop so the swap can start early, and `release()` after it.

Every way of holding the experts offers that same interface (`Experts`: `.high`, `.low`,
`prepare(sampling)`, `release()`): the `Residency`, `ModuleSwap` for library-quantized experts and
`LoadedExperts` for plain modules (the CPU, shards on several GPUs). The pipeline runs one recipe.

An expert may wait in pinned host RAM (`HostExpert.in_ram`, filled once by `fill`, which
`prepare` calls: after the text encoder has run and been freed) or in its memory-mapped checkpoint
(page cache, not private memory). A mapped expert's units pass through `staging` pinned buffers: once
the copies are planned, a prefetch thread (`_Prefetch`) reads the units in the order the copies will
be sent (`send_order`, a replay of the plan) into that ring of buffers, ahead of use, so the swap to a
memory-mapped low-noise expert is staged during the high-noise steps. A send the thread did not
foresee (no plan, a changed one) is read on the calling thread, as before. `stats` counts both and
the time the calling thread waited for staged units (`host_waits`).

Deliberately unsupported: tensor-subclass weights (every state tensor must be a dense plain tensor);
more than two experts.
"""

from __future__ import annotations

import copy
import gc
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import psutil
import torch
import torch.nn as nn

from . import attention
from .checkpoint import open_expert
from .config import ModelConfig, SamplingConfig
from .model import WanModel, compile_blocks
from .pipeline import combine_guidance, computed_steps, step_experts, timesteps
from .quantized.format import runtime_dtype
from .quantized.linear import convert_for_runtime

ALIGN = 256  # bytes; every tensor in a flat unit buffer starts on this boundary
MODES = ("resident", "streaming")
EXPERTS = ("high", "low")
STAGING = 3  # pinned staging buffers (of the largest unit) a memory-mapped expert's units pass through


# ---------------------------------------------------------------------------------------------
# units and their flat layout


def unit_of(name: str) -> str:
    """The unit a state-dict key belongs to: 'blocks.<i>', 'head' or 'embed'."""
    m = re.match(r"(blocks\.\d+)\.", name)
    return m.group(1) if m else "head" if name.startswith("head.") else "embed"


def unit_names(num_layers: int) -> list[str]:
    """Units in the order one forward pass uses them."""
    return ["embed", *(f"blocks.{i}" for i in range(num_layers)), "head"]


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # bytes into the unit's buffer
    nbytes: int


@dataclass(frozen=True)
class Layout:
    """Where each tensor of one unit sits in its flat byte buffer (the same for both experts)."""

    entries: tuple[Entry, ...]
    nbytes: int

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> Layout:
        entries, offset = [], 0
        for name, t in tensors.items():
            if type(t) not in (torch.Tensor, nn.Parameter):
                raise TypeError(f"{name} is a {type(t).__name__}: residency moves plain dense tensors only")
            span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0
            if span != t.numel():
                raise ValueError(f"{name} is not dense (shape {tuple(t.shape)}, stride {t.stride()})")
            nbytes = t.numel() * t.element_size()
            entries.append(Entry(name, tuple(t.shape), tuple(t.stride()), t.dtype, offset, nbytes))
            offset += -(-nbytes // ALIGN) * ALIGN
        return cls(tuple(entries), offset)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed, shaped views into a uint8 buffer of `nbytes` bytes."""
        return {
            e.name: flat[e.offset : e.offset + e.nbytes].view(e.dtype).as_strided(e.shape, e.stride)
            for e in self.entries
        }

    def pack(self, tensors: Callable[[str], torch.Tensor], flat: torch.Tensor) -> None:
        """Copy (and cast) each named tensor into its place in `flat`."""
        for name, view in self.views(flat).items():
            view.copy_(tensors(name))


def layouts_of(template: nn.Module) -> dict[str, Layout]:
    """One layout per unit, from a model's state dict (a meta-device template will do)."""
    by_unit: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in template.state_dict().items():
        by_unit.setdefault(unit_of(name), {})[name] = t
    n = sum(1 for u in by_unit if u.startswith("blocks."))
    return {u: Layout.of(by_unit[u]) for u in unit_names(n)}


def template(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, linears: dict[str, dict] | None = None) -> WanModel:
    """A meta-device WanModel with the dtypes `checkpoint.load_expert(dtype=...)` gives each tensor;
    `linears` (module -> {"scheme", "smooth"}) are 8-bit QuantLinears, as the source stores them."""
    with torch.device("meta"):
        model = WanModel(cfg)
    convert_for_runtime(model, linears or {}, dtype=dtype)
    meta = {"linears": linears or {}}
    state = {n: torch.empty_like(t, dtype=runtime_dtype(n, meta, dtype) or t.dtype)
             for n, t in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# the host side


ALIGN = 4096  # bytes: each unit's buffer starts on a page inside its pinned block
MAX_PINNED_BLOCK = 8 << 30  # bytes: the largest pinned block (few cudaHostAlloc calls, little slack each)


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pack_pinned(sizes: dict[str, int], max_block: int = MAX_PINNED_BLOCK) -> list[tuple[int, dict[str, int]]]:
    """Group buffers of `sizes` (bytes) into blocks whose sizes are powers of two: [(block bytes, {name:
    offset})]. PyTorch's pinned allocator rounds every allocation up to a power of two, so one pinned buffer
    per unit (about 370 MB each for an int8 A14B block) takes about 1.4x the bytes: 47 GB of pinned RAM for
    two 14.9 GB int8 experts, measured on the H200 machine (2026-11-29). Packed first-fit, largest first,
    into blocks of at most `max_block`, each block as large as the bytes left allow, the slack is a few
    percent (`pinned_bytes`)."""
    left = sorted(sizes, key=lambda u: -sizes[u])
    aligned = {u: -(-sizes[u] // ALIGN) * ALIGN for u in sizes}
    blocks = []
    while left:
        total = sum(aligned[u] for u in left)
        block = max(min(max_block, _pow2_floor(total)), _pow2_ceil(aligned[left[0]]))
        if total < block // 2 or total <= ALIGN:  # the last few units: the smallest block that holds them
            block = max(_pow2_ceil(total), ALIGN)
        offsets, used = {}, 0
        for u in list(left):
            if used + aligned[u] <= block:
                offsets[u], used = used, used + aligned[u]
                left.remove(u)
        blocks.append((block, offsets))
    return blocks


def pinned_bytes(sizes: dict[str, int], max_block: int = MAX_PINNED_BLOCK) -> int:
    """The pinned host memory `pinned_buffers(sizes)` takes (bytes)."""
    return sum(block for block, _ in pack_pinned(sizes, max_block))


def pinned_buffers(sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """A uint8 buffer of each size (bytes), in pinned memory: views into few power-of-two blocks
    (`pack_pinned`). Each block is freed when no view into it is left."""
    out = {}
    for block, offsets in pack_pinned(sizes):
        flat = torch.empty(block, dtype=torch.uint8, pin_memory=True)
        out |= {u: flat[off: off + sizes[u]] for u, off in offsets.items()}
    return out


def host_buffers(sizes: dict[str, int], pin: bool) -> dict[str, torch.Tensor]:
    """A uint8 buffer of each size: pinned (`pinned_buffers`) or plain host memory."""
    if pin:
        return pinned_buffers(sizes)
    return {u: torch.empty(n, dtype=torch.uint8) for u, n in sizes.items()}


class HostExpert:
    """One expert's units in host memory: a flat (pinned if asked) buffer per unit (`in_ram`), or read
    on demand from a memory-mapped checkpoint through pinned staging buffers."""

    def __init__(self, layouts: dict[str, Layout], flats: dict[str, torch.Tensor] | None = None,
                 read: Callable[[str], torch.Tensor] | None = None, *, in_ram: bool | None = None,
                 pin: bool = False):
        self.layouts = layouts
        self.flats = flats  # unit -> uint8 buffer; None when served from `read` or not filled yet
        self.read = read  # name -> tensor (memory-mapped): fills the buffers, or is staged at copy time
        self.in_ram = flats is not None if in_ram is None else in_ram  # held in RAM once `fill`ed
        self.pin = pin
        self._filling: threading.Thread | None = None  # fill_async's thread, until fill() joins it
        self._fill_error: BaseException | None = None

    @classmethod
    def empty(cls, layouts: dict[str, Layout], pin: bool) -> HostExpert:
        return cls(layouts, host_buffers({u: lay.nbytes for u, lay in layouts.items()}, pin))

    @classmethod
    def from_module(cls, model: nn.Module, pin: bool | None = None) -> HostExpert:
        """Copy a model's weights into per-unit buffers; pinned when `pin`, or (None) when RAM allows."""
        layouts = layouts_of(model)
        total = sum(lay.nbytes for lay in layouts.values())
        if pin is None:
            pin = torch.cuda.is_available() and psutil.virtual_memory().available > 2 * total
        host = cls.empty(layouts, pin)
        state = model.state_dict()
        for u, lay in layouts.items():
            lay.pack(state.__getitem__, host.flats[u])
        return host

    @classmethod
    def from_checkpoint(cls, source, layouts: dict[str, Layout], *, in_ram: bool = False,
                        pin: bool = True, defer: bool = False) -> HostExpert:
        """From a checkpoint (`checkpoint.open_expert`): read unit by unit into (pinned) RAM with
        `in_ram` (one copy of the expert, cast to the layout's dtypes; with `defer` when `fill` is
        called, e.g. by `Residency.prepare`), else serve each unit from the memory-mapped files through
        pinned staging buffers at copy time."""
        host = cls(layouts, read=source.tensor, in_ram=in_ram, pin=pin and torch.cuda.is_available())
        if not defer:
            host.fill()
        return host

    def fill(self) -> None:
        """Read every unit into (pinned) RAM, once; nothing for an expert served from its files. Waits for
        a `fill_async` in progress (and raises what it raised)."""
        if self._filling is not None:
            thread, self._filling = self._filling, None
            thread.join()
            if self._fill_error is not None:
                error, self._fill_error = self._fill_error, None
                raise RuntimeError(f"reading the expert into RAM failed: {error}") from error
        self._read_all()

    def _read_all(self) -> None:
        if self.in_ram and self.flats is None:
            flats = host_buffers({u: lay.nbytes for u, lay in self.layouts.items()}, self.pin)
            for u, lay in self.layouts.items():
                lay.pack(self.read, flats[u])
            self.flats = flats

    def fill_async(self) -> None:
        """`fill` on a thread: the low-noise expert is read into RAM while the high-noise steps run (its
        copies start in the last high-noise call, which `fill` waits for first)."""
        if self.in_ram and self.flats is None and self._filling is None:
            def run():
                try:
                    self._read_all()
                except BaseException as e:  # handed to the next fill()
                    self._fill_error = e

            self._filling = threading.Thread(target=run, name="wan-lite-fill", daemon=True)
            self._filling.start()

    @property
    def nbytes(self) -> int:
        return sum(lay.nbytes for lay in self.layouts.values())


# ---------------------------------------------------------------------------------------------
# the use sequence (pure: tested without a GPU)


@dataclass(frozen=True)
class Call:
    expert: str  # "high" | "low"
    t: float | None  # the timestep, checked against the real call; None: not checked
    sweeps: int  # passes over the units in this call (2: sequential CFG, pass by pass)


def slot_of(unit: str, mode: str, slots: int) -> str:
    """The device buffer a unit runs from: its own in resident mode; blocks share `slots` when streaming."""
    if mode == "streaming" and unit.startswith("blocks."):
        return f"slot{int(unit.split('.')[1]) % slots}"
    return unit


def next_occupant(calls: list[Call], pos: tuple[int, int, int], units: list[str], mode: str,
                  slots: int) -> tuple[str, str] | None:
    """After the use of units[u] in sweep s of call c, the (expert, unit) that next needs that slot.

    Beyond the planned calls nothing is known: returns None at the end of the plan, so a finished
    plan never sends weights nobody asked for (the next call copies what it needs).
    """
    c, s, u = pos
    slot = slot_of(units[u], mode, slots)
    while True:
        u += 1
        if u == len(units):
            u, s = 0, s + 1
            if s == calls[c].sweeps:
                s, c = 0, c + 1
                if c == len(calls):
                    return None
        if slot_of(units[u], mode, slots) == slot:
            return calls[c].expert, units[u]


class Placement:
    """Which (expert, unit) each device slot holds or is receiving, and which copy to issue when.

    Pure bookkeeping, no tensors: `Residency` runs on it, and `swap_schedule` replays it for tests.
    `calls` is the plan; calls past `planned` were not planned, and the lookahead assumes they repeat.
    """

    def __init__(self, units: list[str], mode: str, slots: int):
        self.units, self.mode, self.slots = units, mode, slots
        self.content: dict[str, tuple[str, str]] = {}
        self.calls: list[Call] = []
        self.planned = 0  # calls[:planned] came from plan_steps

    def slot(self, u: int) -> str:
        return slot_of(self.units[u], self.mode, self.slots)

    def before(self, expert: str, u: int) -> tuple[str, str, str] | None:
        """Before units[u] runs for `expert`: the copy it needs now (slot, expert, unit), if any."""
        want, slot = (expert, self.units[u]), self.slot(u)
        if self.content.get(slot) == want:
            return None
        self.content[slot] = want
        return slot, *want

    def after(self, c: int, s: int, u: int) -> tuple[str, str, str] | None:
        """After units[u] ran in sweep s of call c: the copy to send into its slot now, if any."""
        calls = self.calls if c < self.planned else self.calls[: c + 1] + [self.calls[c]]
        nxt = next_occupant(calls, (c, s, u), self.units, self.mode, self.slots)
        slot = self.slot(u)
        if nxt is None or self.content.get(slot) == nxt:
            return None
        self.content[slot] = nxt
        return slot, *nxt



def _replay(placement: Placement, start: int, overlap: bool = True):
    """Run a plan's calls from `start` on `placement` (mutated: pass a copy) as the residency runs them,
    yielding every copy in order as (call, sweep, "before" | "after", unit used, slot, expert, unit sent)."""
    for c in range(start, len(placement.calls)):
        for s in range(placement.calls[c].sweeps):
            for u, unit in enumerate(placement.units):
                if (copy_ := placement.before(placement.calls[c].expert, u)) is not None:
                    yield c, s, "before", unit, *copy_
                if overlap and (copy_ := placement.after(c, s, u)) is not None:
                    yield c, s, "after", unit, *copy_


def swap_schedule(calls: list[Call], units: list[str], mode: str, slots: int = 2) -> list[tuple]:
    """Replay a plan: every copy in order, as (call, sweep, "before" | "after", unit used, slot, expert,
    unit sent). "before" copies are loads at the moment of use (the first call's, or misses)."""
    placement = Placement(units, mode, slots)
    placement.calls, placement.planned = list(calls), len(calls)
    return list(_replay(placement, 0))


def send_order(placement: Placement, start: int, experts: Iterable[str], overlap: bool = True) -> list[tuple[str, str]]:
    """The (expert, unit) of every copy the residency will send from call `start` to the end of the plan,
    in order, for `experts` only (those served from files): what the prefetch thread stages. Pure: the
    placement is copied, not changed."""
    experts = set(experts)
    return [(e, u) for *_, e, u in _replay(copy.deepcopy(placement), start, overlap) if e in experts]


# ---------------------------------------------------------------------------------------------
# copies: a side CUDA stream with events, or plain copies on the CPU


class _Copier:
    def __init__(self, device: torch.device, measure: bool):
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.measure = measure and self.cuda

    def mark(self):
        """An event on the compute stream, now (timed with `measure`: it also ends a unit's work for the
        gaps of `Stats.gaps`)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event(enable_timing=self.measure)
        event.record()
        return event

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after):
        """dst <- src on the side stream once `after` has passed; returns the copy's done event."""
        if not self.cuda:
            dst.copy_(src)
            return None
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def wait(self, done):
        """Make the compute stream wait for a copy; with `measure`, returns an event pair around the wait."""
        if done is None:
            return None
        if not self.measure:
            torch.cuda.current_stream().wait_event(done)
            return None
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record()
        torch.cuda.current_stream().wait_event(done)
        after.record()
        return before, after


class _Prefetch:
    """A thread that reads memory-mapped units into a ring of pinned staging buffers, in the order the
    residency will send them (`send_order`), as far ahead as the ring allows. `take` hands the next
    staged unit to the calling thread (waiting for it if need be); `give_back` returns its buffer with
    the event of the copy reading it, which the thread waits for before filling the buffer again."""

    def __init__(self, order: list[tuple[str, str]], hosts: dict[str, HostExpert], layouts: dict[str, Layout],
                 buffers: int, pin: bool):
        self.order, self.hosts, self.layouts = order, hosts, layouts
        self.pos = 0  # order[pos] is the next unit `take` hands out
        self.staged: list[tuple[str, str]] = []  # (expert, unit) in the order the thread read them
        self._ready: queue.Queue = queue.Queue()  # (expert, unit, staged view), or the thread's exception
        self._free: queue.Queue = queue.Queue()  # (buffer, copy-done event or None)
        size = max(layouts[u].nbytes for _, u in order)
        ring = host_buffers({f"staging{i}": size for i in range(min(buffers, len(order)))}, pin)  # packed
        self._by_ptr = {buf.data_ptr(): buf for buf in ring.values()}  # a staged view -> its buffer
        for buf in ring.values():
            self._free.put((buf, None))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wan-lite-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for expert, unit in self.order:
                while True:  # a free buffer, or stop
                    if self._stop.is_set():
                        return
                    try:
                        buf, done = self._free.get(timeout=0.05)
                        break
                    except queue.Empty:
                        continue
                if done is not None:
                    done.synchronize()  # the copy out of this buffer has finished
                lay = self.layouts[unit]
                view = buf[: lay.nbytes]
                lay.pack(self.hosts[expert].read, view)
                self.staged.append((expert, unit))
                self._ready.put((expert, unit, view))
        except BaseException as e:  # handed to the calling thread by `take`
            self._ready.put(e)

    def take(self, expert: str, unit: str) -> torch.Tensor | None:
        """The staged buffer of (expert, unit), waiting for the thread; None when it is not next in the
        order (the run left the plan: the caller stages it itself)."""
        if self.pos >= len(self.order) or self.order[self.pos] != (expert, unit):
            return None
        item = self._ready.get()
        if isinstance(item, BaseException):
            raise RuntimeError(f"reading {expert} {unit} from the memory-mapped checkpoint failed: {item}") from item
        self.pos += 1
        return item[2]

    def give_back(self, view: torch.Tensor, done) -> None:
        self._free.put((self._by_ptr[view.data_ptr()], done))

    def close(self) -> None:
        """Stop the thread (it finishes the unit it is reading) and drop the buffers."""
        self._stop.set()
        self._thread.join()


@dataclass
class Stats:
    copies: int = 0  # units sent ahead of their use
    misses: int = 0  # units copied at the moment they were needed: the first load, or no/wrong plan
    bytes: int = 0
    host_wait_s: float = 0.0  # time the calling thread spent on staging: reading units itself, or waiting for them
    staged_ahead: int = 0  # memory-mapped units the prefetch thread had read (or was reading) for the copy
    staged_inline: int = 0  # memory-mapped units read on the calling thread (no plan, or the plan changed)
    compile_s: float | None = None  # wall time of the first compiled block's first call: the trace and the compile
    # (torch.compile; one graph serves every block), as its kernels are queued on the GPU asynchronously
    host_waits: list = field(default_factory=list)  # (call, unit, seconds) the calling thread spent staging
    waits: list = field(default_factory=list)  # (call, unit, event pair) with measure=True
    # (call, unit, event pair) with measure=True: the end of the previous unit's work on the compute stream
    # and the point where this unit may start (after its copy's wait). The GPU sits idle in between for
    # the copy or for the calling thread (staging, launching): the stall the run actually sees.
    gaps: list = field(default_factory=list)

    def stall_ms(self, call: int | None = None) -> float:
        """Compute-stream time spent waiting for copies (all calls, or one call), in ms."""
        if self.waits:
            torch.cuda.synchronize()
        return sum(a.elapsed_time(b) for c, _, (a, b) in self.waits if call is None or c == call)

    def gap_ms(self, call: int | None = None) -> float:
        """GPU idle time between consecutive units of one call (all calls, or one call), in ms: the stall
        the compute stream saw, whatever the cause (a copy not done, the calling thread late)."""
        if self.gaps:
            torch.cuda.synchronize()
        return sum(a.elapsed_time(b) for c, _, (a, b) in self.gaps if call is None or c == call)

    def host_stall_ms(self, call: int | None = None) -> float:
        """Calling-thread time spent staging memory-mapped units (all calls, or one call), in ms."""
        return 1e3 * sum(w for c, _, w in self.host_waits if call is None or c == call)


def host_experts(high, low, *, dtype: torch.dtype = torch.bfloat16, in_ram: bool | tuple[bool, bool] | None = None,
                 defer: bool = False) -> tuple[nn.Module, HostExpert, HostExpert]:
    """(meta template, high, low) for a Residency, from two expert sources (or folders, opened).

    Any source packs the same way (float, our 8-bit layout, and what else `checkpoint` reads): the
    template is a meta WanModel with the source's 8-bit Linears swapped in, each unit is read tensor by
    tensor and cast to the template's dtypes: into (pinned) RAM with `in_ram` (per expert as a
    (high, low) pair, e.g. from `planner.HostPlan`; None: both when RAM holds them with room to spare),
    else served from the memory-mapped files at copy time. `defer`: the RAM is filled by `fill` (the
    residency's `prepare`), not now.
    """
    sources = [open_expert(s) if isinstance(s, (str, Path)) else s for s in (high, low)]
    if sources[0].linears != sources[1].linears or sources[0].config != sources[1].config:
        raise ValueError("the high and low experts differ in config or quantized Linears: use one conversion "
                         "of both (python -m wan_lite.quantize --experts high,low)")
    model = template(sources[0].config, dtype, sources[0].linears)
    layouts = layouts_of(model)
    if in_ram is None:
        in_ram = psutil.virtual_memory().available > 2.2 * sum(lay.nbytes for lay in layouts.values())
    in_ram = (in_ram, in_ram) if isinstance(in_ram, bool) else tuple(in_ram)
    hosts = [HostExpert.from_checkpoint(src, layouts, in_ram=r, defer=defer) for src, r in zip(sources, in_ram)]
    return model, hosts[0], hosts[1]


class Experts(Protocol):
    """What `T2VPipeline` runs: two experts callable as `model(x, t, context)` (optionally `.guided`)."""

    high: Callable
    low: Callable

    def prepare(self, sampling: SamplingConfig) -> None:
        """Before the loop: the steps ahead (the residency plans its copies from them)."""

    def release(self) -> None:
        """After the loop (also after an error or a cancel): give the VRAM back."""


class LoadedExperts:
    """Two plain modules where they are (the CPU, or this rank's shards on several GPUs)."""

    def __init__(self, high: nn.Module, low: nn.Module):
        self.high, self.low = high, low

    def prepare(self, sampling: SamplingConfig) -> None:
        pass  # nothing moves

    def release(self) -> None:
        pass  # they stay loaded for the next run


class ModuleSwap:
    """Experts quantized by a library (optimum-quanto, bitsandbytes) hold tensor subclasses that the
    flat unit buffers cannot pack. For them: the active expert runs as a module on the device, the
    other waits on the CPU, and the switch at the boundary is a plain `.to()` (a visible stall of a
    few seconds, not the overlapped slot swap). `high` / `low` are callable as `model(x, t, context)`."""

    def __init__(self, high: nn.Module, low: nn.Module, device):
        self.models = {"high": high, "low": low}
        self.device = torch.device(device)
        self.active: str | None = None
        self.high, self.low = (lambda x, t, c: self.activate("high")(x, t, c),
                               lambda x, t, c: self.activate("low")(x, t, c))

    def activate(self, name: str) -> nn.Module:
        """The expert `name` on the device, the other sent to the CPU first."""
        if self.active != name:
            self.release()
            self.models[name].to(self.device)
            self.active = name
        return self.models[name]

    def prepare(self, sampling: SamplingConfig) -> None:
        pass  # the switch is a plain move when the low expert is first called

    def release(self) -> None:
        """The active expert back to the CPU, its VRAM freed."""
        if self.active is not None:
            self.models[self.active].to("cpu")
            self.active = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# the residency


class Residency:
    """Both experts' weights and the device slots they run from; `high` / `low` are the experts.

    mode: "resident" (one expert in VRAM, the other on the host, swapped without a stall) or
    "streaming" (blocks cycle through `slots` device buffers). cfg_batched: `guided` runs cond and
    uncond as one batch of 2 (else one after the other; block-major when streaming).
    overlap: send weights ahead of use (off: every copy happens when a unit is needed, to measure).
    compile: `model.compile_blocks` on the device model (fuses the float32 work between matmuls).
    ffn_chunk: tokens per FFN chunk on the device model's blocks (`Block.ffn_chunk`; None: whole).
    measure: time the compute stream's waits for copies (`stats.stall_ms`).
    staging: pinned staging buffers the prefetch thread fills ahead of use for experts served from their
    memory-mapped files (0: no thread, each unit is read on the calling thread at copy time).
    """

    def __init__(self, template: nn.Module, high: HostExpert, low: HostExpert, *, device="cuda",
                 mode: str = "resident", cfg_batched: bool = False, slots: int = 2, overlap: bool = True,
                 compile: bool = False, ffn_chunk: int | None = None, measure: bool = False,
                 staging: int = STAGING):
        if mode not in MODES:
            raise ValueError(f"unknown residency mode {mode!r}: choose one of {', '.join(MODES)}")
        self.template = template
        self.hosts = {"high": high, "low": low}
        self.device = torch.device(device)
        self.mode, self.cfg_batched, self.overlap, self.compile = mode, cfg_batched, overlap, compile
        if ffn_chunk is not None and not hasattr(type(template.blocks[0]), "ffn_chunk"):
            raise ValueError("this model has no FFN chunking (Block.ffn_chunk): run with ffn_chunk=None")
        self.ffn_chunk = ffn_chunk
        self.layouts = layouts_of(template)
        for name, host in self.hosts.items():
            if host.layouts != self.layouts:
                raise ValueError(f"the {name} expert's tensors differ from the model's: build both experts "
                                 "with the same config, dtype and quantization")
        self.units = list(self.layouts)
        n = len(self.units) - 2
        if mode == "streaming" and n % slots:
            divisors = ", ".join(str(k) for k in range(2, n + 1) if n % k == 0)
            raise ValueError(f"streaming slots must divide the {n} blocks (block i runs from slot i % slots, "
                             f"so each call starts where the last one ended): use one of {divisors}")
        self.placement = Placement(self.units, mode, slots)
        self._copier = _Copier(self.device, measure)
        self._model: WanModel | None = None  # the device skeleton, built on first use
        self._buffers: dict[str, torch.Tensor] = {}  # slot -> device uint8 buffer
        self._ready: dict[str, object] = {}  # slot -> copy-done event
        self._free: dict[str, object] = {}  # slot -> compute-done event
        self._staging: list[tuple[torch.Tensor, object]] = []  # pinned staging buffers read on the calling thread
        self.staging = staging
        self._prefetch: _Prefetch | None = None  # the thread staging mapped units ahead, once a plan is known
        self._call = -1  # index into placement.calls of the call running now
        self.stats = Stats()
        self.trace: list[tuple] | None = None  # set to [] to record every copy
        self.high, self.low = Expert(self, "high"), Expert(self, "low")

    # -- the plan --------------------------------------------------------------------------------

    def sweeps(self, guided: bool) -> int:
        """Passes over the units per call: sequential CFG in resident mode goes pass by pass."""
        return 2 if guided and not self.cfg_batched and self.mode == "resident" else 1

    def prepare(self, sampling: SamplingConfig) -> None:
        """Plan the copies for `pipeline.sample(..., sampling)`: one call per computed step, `guided`
        (CFG) unless that expert's guidance is 1.0, when the loop runs the conditional pass alone. A
        step cache decided while sampling ("threshold") cannot be planned: every call then runs unplanned
        (correct; the copies at the switch are not sent ahead, one visible stall; memory-mapped units are
        read on the calling thread). Fills the experts held in RAM now (not before: the text encoder has
        been freed by the time the loop starts): the first step's expert at once, the other on a thread
        (`HostExpert.fill_async`) while the first one's steps run."""
        guided = {"high": sampling.guidance_high != 1.0, "low": sampling.guidance_low != 1.0}
        if sampling.cache.mode == "threshold":
            ts = []
        else:
            ts = [t for t, run in zip(timesteps(sampling), computed_steps(sampling)) if run]
        first = step_experts(sampling)[0]  # the first step is always computed
        self.hosts[first].fill()  # the first call copies from it at once
        self.plan_steps(ts, sampling.boundary, guided=guided, num_train_timesteps=sampling.num_train_timesteps)
        for name, host in self.hosts.items():  # after plan_steps: the prefetch's pinned staging ring is
            if name != first:  # allocated before this thread's pinned blocks (one pinned allocator lock)
                host.fill_async()  # read while the first expert's steps run; its first copy waits for it

    def plan_steps(self, timesteps: Iterable[float], boundary: float, *, guided: bool | dict[str, bool] = True,
                   calls_per_step: int = 1, num_train_timesteps: int = 1000) -> None:
        """Tell the residency the steps ahead: per step `calls_per_step` calls of the expert that
        `t >= boundary * num_train_timesteps` picks (boundary is the ratio, 0.875), each a `guided` call
        (CFG in one call) or a plain `model(x, t, context)` pass; `guided` per expert as a dict."""
        guided = guided if isinstance(guided, dict) else {"high": guided, "low": guided}
        at = boundary * num_train_timesteps
        plan = []
        for t in timesteps:
            expert = "high" if t >= at else "low"
            plan += [Call(expert, float(t), self.sweeps(guided[expert]))] * calls_per_step
        p = self.placement
        p.calls = p.calls[: self._call + 1] + plan
        p.planned = len(p.calls)
        self._start_prefetch()

    def _start_prefetch(self) -> None:
        """Stage the memory-mapped experts' units of the planned copies ahead, on a thread."""
        self._stop_prefetch()
        mapped = [name for name, host in self.hosts.items() if not host.in_ram]
        order = send_order(self.placement, self._call + 1, mapped, self.overlap) if self.staging else []
        if order:
            self._prefetch = _Prefetch(order, self.hosts, self.layouts, self.staging, pin=self._copier.cuda)

    def _stop_prefetch(self) -> None:
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None

    def swap_stall_ms(self) -> float | None:
        """The visible cost of the switch to the low-noise expert, in ms (with measure=True on CUDA): the
        GPU's idle time between units (`Stats.gaps`) in the last high-noise call and the first low-noise
        call, plus the compute stream's wait for the first low-noise unit's copy. Without measure (or on the
        CPU): the calling thread's time staging units in those two calls, an upper bound (the GPU works
        through its queue meanwhile). None when the calls so far never switched."""
        calls = self.placement.calls[: self._call + 1]
        first = next((c for c in range(1, len(calls)) if calls[c].expert == "low" and calls[c - 1].expert == "high"),
                     None)
        if first is None:
            return None
        if self._copier.measure:
            unit0 = sum(a.elapsed_time(b) for c, u, (a, b) in self.stats.waits if c == first and u == self.units[0])
            return self.stats.gap_ms(first - 1) + self.stats.gap_ms(first) + unit0
        return self.stats.host_stall_ms(first - 1) + self.stats.host_stall_ms(first)

    def where(self) -> dict[str, list[str]]:
        """Which expert's units sit (or are on their way) in the device slots."""
        out = {e: [] for e in EXPERTS}
        for expert, unit in self.placement.content.values():
            out[expert].append(unit)
        return out

    def release(self) -> None:
        """Give the VRAM back (before the VAE decodes, say); the next call loads what it needs."""
        self._stop_prefetch()
        if self._copier.cuda:
            torch.cuda.synchronize(self.device)
        self._model, self._buffers, self._ready, self._free, self._staging = None, {}, {}, {}, []
        self.placement.content = {}
        if self._copier.cuda:  # a compiled skeleton can sit in reference cycles: collect them, so its
            gc.collect()  # weights are freed before the VAE decodes, not at the next automatic collection
            torch.cuda.empty_cache()

    @property
    def device_bytes(self) -> int:
        """VRAM the slots take: the weights' share of this mode."""
        return sum(self._slot_sizes().values())

    # -- running a call ------------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, expert: str, t: torch.Tensor, sweeps: list[list[tuple[torch.Tensor, torch.Tensor]]]):
        """Run the model with `expert`'s weights over `sweeps`, each a list of (x, context) passes that
        go through the blocks together (block-major); returns the outputs in pass order."""
        self._begin(expert, t, len(sweeps))
        model, outs, last = self._skeleton(), [], len(self.units) - 1
        for s, passes in enumerate(sweeps):
            self._use(expert, 0)
            states = [model.embed(x, t, ctx) for x, ctx in passes]
            self._done(s, 0)
            hs = [h for h, _ in states]
            for i, block in enumerate(model.blocks):
                self._use(expert, i + 1)
                start = time.perf_counter()
                hs = [block(h, cond) for h, (_, cond) in zip(hs, states)]
                if self.compile and self.stats.compile_s is None:
                    self.stats.compile_s = time.perf_counter() - start
                self._done(s, i + 1)
            self._use(expert, last)
            outs += [model.unembed(h, cond) for h, (_, cond) in zip(hs, states)]
            self._done(s, last)
        return outs

    def _begin(self, expert: str, t: torch.Tensor, sweeps: int) -> None:
        self._call += 1
        c, p, t0 = self._call, self.placement, float(t.reshape(-1)[0])
        if c < len(p.calls):
            planned = p.calls[c]
            if (planned.expert, planned.sweeps) != (expert, sweeps) or planned.t not in (None, t0):
                raise RuntimeError(
                    f"call {c} runs the {expert} expert at t={t0} with {sweeps} sweep(s), but plan_steps "
                    f"said {planned.expert} at t={planned.t} with {planned.sweeps}: call prepare(sampling) (or "
                    "plan_steps) with the loop's sampling settings")
        else:  # no plan: the lookahead assumes this call repeats
            p.calls.append(Call(expert, t0, sweeps))

    def _use(self, expert: str, u: int) -> None:
        """Before units[u] runs: its slot must hold `expert`'s copy, and the compute stream waits for it."""
        if (copy_ := self.placement.before(expert, u)) is not None:
            self.stats.misses += 1
            self._send(*copy_)
        waited = self._copier.wait(self._ready.pop(self.placement.slot(u), None))
        if waited is not None:
            self.stats.waits.append((self._call, self.units[u], waited))
        if self._copier.measure and u > 0:  # unit 0's gap would count the sampler's work between calls
            start = self._copier.mark()
            self.stats.gaps.append((self._call, self.units[u], (self._free[self.placement.slot(u - 1)], start)))

    def _done(self, s: int, u: int) -> None:
        """After units[u] ran in sweep s: send the slot's next occupant, if it is another (expert, unit)."""
        self._free[self.placement.slot(u)] = self._copier.mark()
        if self.overlap and (copy_ := self.placement.after(self._call, s, u)) is not None:
            self.stats.copies += 1
            self._send(*copy_)

    def _send(self, slot: str, expert: str, unit: str) -> None:
        host, nbytes = self.hosts[expert], self.layouts[unit].nbytes
        if self.trace is not None:
            self.trace.append((self._call, slot, expert, unit))
        if host.in_ram:
            host.fill()  # (prepare did, unless the loop runs unplanned)
            src, ahead = host.flats[unit], False
        else:
            src, ahead = self._staged(expert, unit)
        self._ready[slot] = done = self._copier.copy(self._buffers[slot][:nbytes], src, self._free.get(slot))
        self.stats.bytes += nbytes
        if ahead:
            self._prefetch.give_back(src, done)
        elif not host.in_ram:
            self._staging.append((src, done))

    def _staged(self, expert: str, unit: str) -> tuple[torch.Tensor, bool]:
        """A memory-mapped unit in a pinned staging buffer: the prefetch thread's (True) when it is the one
        the thread read next, else read now on the calling thread (False; the thread stops: the run left
        the plan). The calling thread's time is recorded in `stats.host_waits`."""
        start = time.perf_counter()
        staged = self._prefetch.take(expert, unit) if self._prefetch is not None else None
        ahead = staged is not None
        if ahead:
            self.stats.staged_ahead += 1
        else:
            self._stop_prefetch()
            staged = self._stage(self.hosts[expert], unit)
            self.stats.staged_inline += 1
        waited = time.perf_counter() - start
        self.stats.host_wait_s += waited
        self.stats.host_waits.append((self._call, unit, waited))
        return staged, ahead

    def _stage(self, host: HostExpert, unit: str) -> torch.Tensor:
        """Read a unit from the memory-mapped checkpoint into a pinned staging buffer (two, in turn)."""
        nbytes = self.layouts[unit].nbytes
        if len(self._staging) >= 2:  # reuse the oldest buffer once its copy is done
            buf, done = self._staging.pop(0)
            if done is not None:
                done.synchronize()
            buf = buf._base if buf._base is not None else buf
        else:
            size = max(lay.nbytes for lay in self.layouts.values())
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=self._copier.cuda)
        self.layouts[unit].pack(host.read, buf[:nbytes])
        return buf[:nbytes]

    def _slot_sizes(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for u, lay in enumerate(self.layouts.values()):
            slot = self.placement.slot(u)
            sizes[slot] = max(sizes.get(slot, 0), lay.nbytes)
        return sizes

    def _skeleton(self) -> WanModel:
        """The device model: each unit's tensors are views into its slot's buffer (shared when streaming)."""
        if self._model is None:
            self._buffers = {slot: torch.empty(n, dtype=torch.uint8, device=self.device)
                             for slot, n in self._slot_sizes().items()}
            state = {}
            for u, lay in enumerate(self.layouts.values()):
                state.update(lay.views(self._buffers[self.placement.slot(u)]))
            model = copy.deepcopy(self.template)
            model.load_state_dict(state, assign=True)
            self._model = model.eval().requires_grad_(False)
            if self.ffn_chunk is not None:
                for block in self._model.blocks:
                    block.ffn_chunk = self.ffn_chunk
            if self.compile:  # the kernel resolved first, so that one compiled graph serves every block
                attention.resolved(next(iter(self._buffers.values())).device)
                compile_blocks(self._model)
        return self._model


class Expert:
    """One expert as the loop sees it: `expert(x, t, context)`, or `expert.guided(...)` for CFG in one call."""

    def __init__(self, residency: Residency, name: str):
        self.residency, self.name = residency, name

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.residency.run(self.name, t, [[(x, context)]])[0]

    def guided(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, context_null: torch.Tensor,
               scale: float) -> torch.Tensor:
        """uncond + scale * (cond - uncond) in float32, as `pipeline.guided_velocity`, from one call."""
        r = self.residency
        if r.cfg_batched:
            n = max(context.shape[1], context_null.shape[1])
            pad = lambda c: torch.nn.functional.pad(c, (0, 0, 0, n - c.shape[1]))  # zeros, as the model pads
            both = r.run(self.name, torch.cat([t, t]), [[(torch.cat([x, x]), torch.cat([pad(context),
                                                                                        pad(context_null)]))]])[0]
            cond, uncond = both.float().chunk(2)
        elif r.mode == "streaming":  # block-major: both passes through block i before block i+1
            cond, uncond = (v.float() for v in r.run(self.name, t, [[(x, context), (x, context_null)]]))
        else:  # pass by pass
            cond, uncond = (v.float() for v in r.run(self.name, t, [[(x, context)], [(x, context_null)]]))
        return combine_guidance(cond, uncond, scale)
