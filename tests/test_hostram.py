"""Host RAM: the planner's host placement for given budgets, the prefetch of memory-mapped experts (its
order, pure; the thread, on the CPU), results equal to the in-RAM path, the experts' RAM filled only
after the text encoder is freed, and the private / file-backed memory report."""

from __future__ import annotations

import dataclasses
import math
import mmap
import re
import sys
import time

import numpy as np
import pytest
import torch
from builders_t2v import tiny_official_root
from tolerance import assert_close_fp32, rel_error

from wan_lite import hostmem, planner
from wan_lite.config import ModelConfig, SamplingConfig
from wan_lite.hostmem import HostMemory, PeakSampler, host_memory, parse_status
from wan_lite.pipeline import sample
from wan_lite.planner import GB, HOST_FIXED, PlanError, decode_host_bytes, make_plan, unit_bytes
from wan_lite.residency import (
    STAGING,
    Call,
    HostExpert,
    Placement,
    Residency,
    host_experts,
    pinned_bytes,
    send_order,
    swap_schedule,
    unit_names,
)

A14B = ModelConfig.a14b()
HOPPER = dict(device="cuda", capability=(9, 0), compile=True)
P720 = dict(height=720, width=1280, frames=81)  # 24 GB VRAM: resident, text encoder on the GPU
P480 = dict(height=480, width=832, frames=81)  # 8 GB VRAM: streaming, text encoder on the CPU


def expert_bytes(scheme: str) -> tuple[int, int]:
    """(E, U): one expert's bytes and its largest unit, from the planner's unit layouts."""
    embed, block, head = unit_bytes(A14B, scheme)
    return embed + head + A14B.num_layers * block, max(embed, block, head)


def pinned_expert_bytes(scheme: str) -> tuple[int, int]:
    """(E, R) as pinned RAM holds them: the expert packed in power-of-two blocks, the STAGING staging buffers
    (each of the largest unit) packed together."""
    embed, block, head = unit_bytes(A14B, scheme)
    units = {"embed": embed, "head": head} | {f"blocks.{i}": block for i in range(A14B.num_layers)}
    return pinned_bytes(units), pinned_bytes({f"s{i}": max(embed, block, head) for i in range(STAGING)})


# ---------------------------------------------------------------------------------------------
# the planner


# (scheme, ram GB) -> host mode at 720p with 24 GB VRAM (text encoder on the GPU). int8: E = 14.9 GB,
# bf16: E = 29.0 GB (15.6 and 30.1 GB in pinned RAM, packed in power-of-two blocks);
# the largest unit (embed, with its float32 time projection) 0.83 GB.
HOST_BUDGETS = {
    ("int8", 64): "pinned", ("int8", 36): "pinned", ("int8", 33): "mapped", ("int8", 24): "mapped",
    ("int8", 16): "streamed", ("int8", 8): "streamed",
    ("none", 64): "pinned", ("none", 40): "mapped", ("none", 32): "streamed", ("none", 8): "streamed",
}


@pytest.mark.parametrize(("scheme", "ram"), list(HOST_BUDGETS))
def test_host_plan_for_budget(scheme, ram):
    plan = make_plan(24, scheme=scheme, ram_gb=ram, **P720, **HOPPER)
    host = plan.host
    assert host.mode == HOST_BUDGETS[(scheme, ram)] and plan.text_device == "cuda"
    E, _ = expert_bytes(scheme)
    P, R = pinned_expert_bytes(scheme)
    experts = {"pinned": 2 * P, "mapped": P + R, "streamed": R}[host.mode]
    assert (host.high, host.low) == {"pinned": ("ram", "ram"), "mapped": ("file", "ram"),
                                     "streamed": ("file", "file")}[host.mode]
    assert host.staging == (0 if host.mode == "pinned" else STAGING)
    assert host.experts_gb == pytest.approx(experts / GB, abs=0.01) and plan.host_gb == host.experts_gb
    assert host.mapped_gb == pytest.approx(E / GB * (host.high, host.low).count("file"), abs=0.01)
    other = HOST_FIXED + decode_host_bytes(1280, 720, 81)
    assert host.peak_gb == pytest.approx((other + experts) / GB, abs=0.01) and host.peak_gb <= ram
    assert host.text_gb == 0 and host.keep_between_runs
    assert "host RAM" in plan.describe() and f"of {float(ram):.1f} GB" in plan.describe()


def test_text_encoder_on_the_cpu_runs_before_the_experts_fill():
    """With the text encoder on the CPU the peak is the larger phase, not the sum: 16 GB holds the
    11.4 GB encoder or the streamed experts, never both; the experts then do not stay filled between runs."""
    text = 11.4 * GB
    plan = make_plan(8, scheme="int8", ram_gb=16, text_bytes=text, **P480, **HOPPER)
    host = plan.host
    assert plan.text_device == "cpu" and host.mode == "streamed" and host.text_gb == pytest.approx(11.4)
    assert host.peak_gb == pytest.approx((HOST_FIXED + decode_host_bytes(832, 480, 81) + text) / GB, abs=0.01)
    E, _ = expert_bytes("int8")
    roomy = make_plan(8, scheme="int8", ram_gb=40, text_bytes=text, **P480, **HOPPER).host
    assert roomy.mode == "pinned" and roomy.peak_gb < (2 * E + text) / GB  # phases apart
    assert not roomy.keep_between_runs  # 2E + encoder + the rest = 43 GB > 40: refilled after the next encode
    assert make_plan(8, scheme="int8", ram_gb=80, text_bytes=text, **P480, **HOPPER).host.keep_between_runs


@pytest.mark.parametrize(("scheme", "vram", "res"), [("int8", 24, P720), ("none", 40, P720), ("int8", 8, P480)])
def test_too_little_ram_names_the_smallest_budget(scheme, vram, res):
    with pytest.raises(PlanError, match=r"host RAM is too small") as err:
        make_plan(vram, scheme=scheme, ram_gb=2.0, **res, **HOPPER)
    smallest = float(re.search(r"smallest budget that works is (\d+\.\d) GB", str(err.value)).group(1))
    assert make_plan(vram, scheme=scheme, ram_gb=smallest, **res, **HOPPER).host.mode == "streamed"
    with pytest.raises(PlanError):
        make_plan(vram, scheme=scheme, ram_gb=smallest - 0.1, **res, **HOPPER)
    assert ("text encoder on the CPU" in str(err.value)) == (res is P480)


def test_default_ram_budget_is_what_is_available(monkeypatch):
    available = type("VM", (), {"available": 18 * GB})()
    monkeypatch.setattr(planner.psutil, "virtual_memory", lambda: available)
    host = make_plan(24, scheme="int8", **P720, **HOPPER).host
    assert host.ram_gb == 18 and host.mode == "streamed"  # mapped needs 20.0 GB
    available.available = 40 * GB
    assert make_plan(24, scheme="int8", **P720, **HOPPER).host.mode == "pinned"


# ---------------------------------------------------------------------------------------------
# the prefetch order (pure)


def test_send_order_is_the_replayed_schedule_for_mapped_experts():
    """Resident, 2 high + 2 low calls with sequential CFG: a memory-mapped low expert's units are staged
    in unit order, all of them for the last high call's sends; with both mapped, the high expert's first
    load comes first. Streaming: each call's blocks in the order they cycle through the slots."""
    units = unit_names(3)
    calls = [Call("high", 999, 2), Call("high", 950, 2), Call("low", 800, 2), Call("low", 500, 2)]
    placement = Placement(units, "resident", 2)
    placement.calls, placement.planned = list(calls), len(calls)
    assert send_order(placement, 0, ["low"]) == [("low", u) for u in units]
    assert send_order(placement, 0, ["high", "low"]) == [("high", u) for u in units] + [("low", u) for u in units]
    assert placement.content == {}  # pure: the placement is not changed
    sched = swap_schedule(calls, units, "resident")
    assert [(c[5], c[6]) for c in sched] == send_order(placement, 0, ["high", "low"])
    assert all(c[0] == 1 and c[2] == "after" for c in sched if c[5] == "low")  # sent in the last high call

    stream = Placement(unit_names(4), "streaming", 2)
    stream.calls, stream.planned = [Call("high", 999, 1), Call("low", 800, 1)], 2
    order = send_order(stream, 0, ["high", "low"])
    assert order == [(c[5], c[6]) for c in swap_schedule(stream.calls, unit_names(4), "streaming")]
    # the order of the sends, not of use: block i + 2 is sent as soon as block i is done with its slot
    assert order == [("high", "embed"), ("low", "embed"), ("high", "blocks.0"), ("high", "blocks.2"),
                     ("high", "blocks.1"), ("high", "blocks.3"), ("low", "blocks.0"), ("low", "blocks.1"),
                     ("high", "head"), ("low", "head"), ("low", "blocks.2"), ("low", "blocks.3")]


# ---------------------------------------------------------------------------------------------
# the thread, and results equal to the in-RAM path (CPU, tiny model from files)


def denoise_inputs(cfg, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_dim, 2, 4, 6, generator=g)
    return x, torch.randn(1, 7, cfg.text_dim, generator=g), torch.randn(1, 3, cfg.text_dim, generator=g)


SAMPLING = SamplingConfig(steps=4, shift=3.0)  # t = 999, 964 (high); 895, 739 (low)


@pytest.fixture(scope="module")
def in_ram_latents(official_root):
    tmpl, high, low = host_experts(official_root.high, official_root.low, dtype=torch.float32, in_ram=True)
    res = Residency(tmpl, high, low, device="cpu")
    res.prepare(SAMPLING)
    return sample(res.high, res.low, *denoise_inputs(tmpl.cfg), SAMPLING)


@pytest.mark.parametrize("mode", ["resident", "streaming"])
@pytest.mark.parametrize("in_ram", [(True, False), (False, False)], ids=["low-mapped", "both-mapped"])
def test_mapped_experts_sample_like_in_ram_through_the_prefetch(official_root, in_ram_latents, mode, in_ram):
    """Every memory-mapped unit the loop sends was staged by the thread, in the replayed order, none on
    the calling thread; the ring is full before the last high step; the latents are the in-RAM ones."""
    tmpl, high, low = host_experts(official_root.high, official_root.low, dtype=torch.float32, in_ram=in_ram,
                                   defer=True)
    res = Residency(tmpl, high, low, device="cpu", mode=mode)
    res.prepare(SAMPLING)
    assert high.flats is not None if in_ram[0] else high.flats is None  # filled by prepare, or mapped
    prefetch = res._prefetch
    mapped = ["high", "low"] if not in_ram[0] else ["low"]
    ring = []

    def after_step(step, total, t, expert):
        if step == 0 and in_ram[0]:  # nothing of the low expert has been sent yet: the ring fills, no more
            deadline = time.monotonic() + 10
            while len(prefetch.staged) < min(STAGING, len(prefetch.order)) and time.monotonic() < deadline:
                time.sleep(0.01)
            ring.append((len(prefetch.staged), prefetch.pos))

    got = sample(res.high, res.low, *denoise_inputs(tmpl.cfg), SAMPLING, callback=after_step)
    assert_close_fp32(got, in_ram_latents)  # memory-mapped + staged vs one in-RAM copy
    assert prefetch.order == send_order(_fresh(res, mode), 0, mapped)
    assert prefetch.staged == prefetch.order and prefetch.pos == len(prefetch.order)
    assert res.stats.staged_ahead == len(prefetch.order) and res.stats.staged_inline == 0
    assert {e for e, _ in prefetch.order} == set(mapped)
    if in_ram[0]:
        assert ring == [(STAGING, 0)]
    assert res.swap_stall_ms() is not None
    res.release()
    assert res._prefetch is None


def _fresh(res: Residency, mode: str) -> Placement:
    """The residency's plan on an empty placement (what `prepare` replayed)."""
    p = Placement(res.units, mode, 2)
    p.calls, p.planned = list(res.placement.calls), len(res.placement.calls)
    return p


def test_an_unplanned_call_is_staged_on_the_calling_thread(official_root, in_ram_latents):
    """A run that leaves the plan stops the thread and reads what it needs itself: still correct."""
    tmpl, high, low = host_experts(official_root.high, official_root.low, dtype=torch.float32, in_ram=False)
    res = Residency(tmpl, high, low, device="cpu", mode="streaming")
    res.plan_steps([999], SAMPLING.boundary)  # one call planned: the loop makes four
    got = sample(res.high, res.low, *denoise_inputs(tmpl.cfg), SAMPLING)
    assert_close_fp32(got, in_ram_latents)
    assert res.stats.staged_ahead > 0 and res.stats.staged_inline > 0 and res._prefetch is None


def test_a_read_error_in_the_thread_reaches_the_loop(official_root):
    tmpl, high, low = host_experts(official_root.high, official_root.low, dtype=torch.float32, in_ram=False)

    def broken(name):
        raise OSError(f"disk gone: {name}")

    high.read = broken
    res = Residency(tmpl, high, low, device="cpu")
    res.prepare(SAMPLING)
    with pytest.raises(RuntimeError, match="memory-mapped checkpoint failed: disk gone"):
        sample(res.high, res.low, *denoise_inputs(tmpl.cfg), SAMPLING)
    res.release()


# ---------------------------------------------------------------------------------------------
# the pipeline: the plan decides, the RAM fills after the text encoder is gone


@pytest.fixture(scope="module")
def t2v_root(tmp_path_factory):
    return tiny_official_root(tmp_path_factory.mktemp("hostram"))


T2V_RUN = dict(size=(48, 32), frames=5, steps=3, seed=5)


def open_pipe(root, cache):
    from wan_lite.t2v import T2VPipeline

    return T2VPipeline.from_pretrained(root, device="cpu", dtype=torch.float32, text_dtype=torch.float32,
                                       cache_dir=cache)


@pytest.fixture(scope="module")
def plain_run(t2v_root, tmp_path_factory):
    return open_pipe(t2v_root, tmp_path_factory.mktemp("plain-cache"))("a dog runs in snow", **T2V_RUN)


@pytest.mark.parametrize("where", [("file", "ram"), ("ram", "file"), ("file", "file")])
def test_pipeline_holds_the_experts_where_the_plan_says(t2v_root, plain_run, tmp_path, monkeypatch, where):
    """The plan's placement per expert, the RAM filled only after the text encoder ran and was freed,
    mapped units all staged by the thread, the latents of the plain run."""
    pipe = open_pipe(t2v_root, tmp_path / "cache")  # a cache of its own: the planned run loads the encoder
    kw = T2V_RUN
    ref = plain_run
    plan = pipe.make_plan((48, 32), 5, vram_gb=24, ram_gb=64)
    assert plan.host.mode == "pinned" and plan.host.text_gb < 0.01  # the tiny encoder's file
    plan = dataclasses.replace(plan, host=dataclasses.replace(plan.host, high=where[0], low=where[1]))
    fills = []
    real_fill = HostExpert.fill
    monkeypatch.setattr(HostExpert, "fill", lambda self: (fills.append(pipe.text.model is None), real_fill(self)))
    encoded = []
    real_encode = type(pipe.text).encode
    monkeypatch.setattr(type(pipe.text), "encode",
                        lambda self, prompts: (encoded.append(len(fills)), real_encode(self, prompts))[1])
    result = pipe("a dog runs in snow", plan=plan, **kw)
    assert_close_fp32(result.latents, ref.latents)  # pinned / mapped host buffers vs loaded modules
    assert tuple(h.in_ram for h in pipe.hosts[1:]) == tuple(w == "ram" for w in where)
    assert encoded == [0] and fills and all(fills)  # filled only after the encoder ran and was freed
    stats = pipe.residency.stats
    assert stats.staged_inline == 0 and (stats.staged_ahead > 0) == ("file" in where)


# ---------------------------------------------------------------------------------------------
# the memory report


STATUS = """Name:\tpython
VmPeak:\t 9000000 kB
VmHWM:\t  3000000 kB
VmRSS:\t  2500000 kB
RssAnon:\t  1000000 kB
RssFile:\t  1400000 kB
RssShmem:\t  100000 kB
"""


def test_parse_status():
    m = parse_status(STATUS)
    assert m == HostMemory(private=1_024_000_000, file=1_433_600_000, shmem=102_400_000, hwm=3_072_000_000)
    assert m.to_dict()["private_gb"] == 1.024 and "1.02 GB private" in m.describe()
    with pytest.raises(ValueError, match="RssAnon"):
        parse_status("VmHWM:\t 1 kB\n")


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/status is Linux's")
def test_sampler_sees_private_and_file_backed_peaks(tmp_path):
    """200 MB of private anonymous pages touched and freed inside the sampler raise the private peak;
    shared ones the shmem peak; reading a 200 MB memory-mapped file the file-backed one, not the private."""
    n = 200 * 2**20
    before = host_memory()
    with PeakSampler(interval=0.01) as sampler:
        anon = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # fresh pages (malloc may reuse)
        np.frombuffer(anon, dtype=np.uint8)[:] = 1
        time.sleep(0.1)
        anon.close()
    assert sampler.peak.private - before.private > 0.8 * n
    assert sampler.peak.hwm >= sampler.peak.private
    with PeakSampler(interval=0.01) as shared:  # shared memory (as a checkpoint in /dev/shm) is its own field
        anon = mmap.mmap(-1, n, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        np.frombuffer(anon, dtype=np.uint8)[:] = 1
        time.sleep(0.1)
        anon.close()
    assert shared.peak.shmem - before.shmem > 0.8 * n and shared.peak.private - before.private < 0.5 * n
    path = tmp_path / "blob"
    path.write_bytes(b"\1" * n)
    before = host_memory()
    with PeakSampler(interval=0.01) as sampler:
        m = np.memmap(path, dtype=np.uint8, mode="r")
        assert int(m[:: 4096].sum()) == math.ceil(n / 4096)  # touch every page
        time.sleep(0.1)
        del m
    assert sampler.peak.file - before.file > 0.8 * n
    assert sampler.peak.private - before.private < 0.5 * n


def test_fallback_without_proc(monkeypatch, tmp_path):
    monkeypatch.setattr(hostmem, "STATUS", tmp_path / "absent")
    m = host_memory()
    assert m.private > 0 and m.file == 0 and m.hwm >= m.private * 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["resident", "streaming"])
def test_gpu_mapped_low_expert_through_the_prefetch(official_root, mode):
    """On CUDA (pinned ring, copy events, side stream): the low expert served from its file through the
    prefetch thread gives the latents of both experts in RAM on the same card (fp32 tolerance: different
    memory), nothing is staged on the calling thread, and the stall is measured."""
    def run(in_ram):
        tmpl, high, low = host_experts(official_root.high, official_root.low, dtype=torch.float32, in_ram=in_ram,
                                       defer=True)
        res = Residency(tmpl, high, low, device="cuda", mode=mode)
        res.prepare(SAMPLING)
        x, ctx, ctx_null = (t.cuda() for t in denoise_inputs(tmpl.cfg))
        out = sample(res.high, res.low, x, ctx, ctx_null, SAMPLING).cpu()
        stats, stall = res.stats, res.swap_stall_ms()
        res.release()
        return out, stats, stall

    ref, _, _ = run((True, True))
    got, stats, stall = run((True, False))
    err = rel_error(got, ref)
    assert err < 1e-5, err
    assert stats.staged_inline == 0 and stats.staged_ahead > 0 and stall is not None


# ---------------------------------------------------------------------------------------------
# filling an expert on a thread


def _tiny_host(read=None):
    from wan_lite.model import WanModel
    from wan_lite.residency import HostExpert, layouts_of

    model = WanModel(ModelConfig.tiny()).eval()
    state = model.state_dict()
    return HostExpert(layouts_of(model), read=read or state.__getitem__, in_ram=True, pin=False), state


def test_fill_async_fills_on_a_thread_and_fill_waits_for_it():
    host, _ = _tiny_host()
    ref, _ = _tiny_host()
    ref.read = host.read
    ref.fill()
    host.fill_async()
    assert host._filling is not None and host._filling.name == "wan-lite-fill"
    host.fill()  # joins the thread
    assert host._filling is None and host.flats is not None
    for u, lay in host.layouts.items():  # the same tensors read the same way: stored bytes compared
        got, want = lay.views(host.flats[u]), lay.views(ref.flats[u])  # (alignment padding is not written)
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in got)


def test_fill_async_error_is_raised_by_the_next_fill():
    def broken(name):
        raise OSError(f"read error in {name}")

    host, _ = _tiny_host(read=broken)
    host.fill_async()
    with pytest.raises(RuntimeError, match="reading the expert into RAM failed: read error"):
        host.fill()


def test_prepare_fills_the_first_expert_now_and_the_other_on_a_thread(monkeypatch):
    """Lightning (2 high + 2 low steps): the high-noise expert is filled before the loop, the low-noise one
    by fill_async (its copies wait for it in the last high-noise call)."""
    from wan_lite.residency import HostExpert, Residency

    high, _ = _tiny_host()
    low, _ = _tiny_host()
    calls = []
    monkeypatch.setattr(HostExpert, "fill", lambda self: calls.append(("fill", self is high)))
    monkeypatch.setattr(HostExpert, "fill_async", lambda self: calls.append(("async", self is high)))
    from wan_lite.model import WanModel

    res = Residency(WanModel(ModelConfig.tiny()).eval(), high, low, device="cpu")
    res.prepare(SamplingConfig.lightning())
    assert calls == [("fill", True), ("async", False)]


def test_one_run_reads_both_experts_from_their_files_when_resident():
    """generate (one run): a resident plan serves both experts from their files whatever the budget; a
    streaming plan keeps choosing by the budget (every step reads the experts again there)."""
    resident = make_plan(24, scheme="int8", ram_gb=64, one_run=True, **P720, **HOPPER)
    assert resident.mode == "resident" and resident.host.mode == "streamed"
    assert make_plan(24, scheme="int8", ram_gb=64, **P720, **HOPPER).host.mode == "pinned"
    streaming = make_plan(8, scheme="int8", ram_gb=64, one_run=True, **P480, **HOPPER)
    assert streaming.mode == "streaming" and streaming.host.mode == "pinned"
