"""Time to the first step (issue 14): the read-ahead of the text encoder's weights from the pipeline's creation
and of the high-noise expert's files after them (`checkpoint.read_ahead`), one compiled graph for every block,
no FSDP and no diffusers import before the text phase, and the start-up's parts in --stats. What the disk then
does is measured on the device (BENCHMARKS.md); here, what is read, in which order, and when."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from builders_t2v import tiny_official_root
from tolerance import assert_close_fp32

from wan_lite import checkpoint, residency
from wan_lite.checkpoint import read_ahead
from wan_lite.config import ModelConfig
from wan_lite.planner import GB
from wan_lite.residency import HostExpert, Residency, template

KIB = 2**10
REPO = Path(checkpoint.__file__).resolve().parents[1]


def _write(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


def _python(code: str) -> str:
    """Run `code` in a fresh interpreter on this checkout; its stdout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"),
                                                        os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                          check=True).stdout


# ---------------------------------------------------------------------------------------------
# the helper


def test_read_ahead_reads_each_shard_in_order_up_to_the_budget(tmp_path):
    """Sorted shards read from their start, the first `max_bytes` only; config.json and the index untouched."""
    folder = tmp_path / "high_noise_model"
    shards = [_write(folder / f"diffusion_pytorch_model-0000{i}-of-00002.safetensors", n)
              for i, n in ((1, 300 * KIB), (2, 200 * KIB))]
    for name in ("config.json", "diffusion_pytorch_model.safetensors.index.json"):
        _write(folder / name, 100)
    thread = read_ahead(folder, 400 * KIB)
    thread.join(timeout=30)
    assert list(thread.read.items()) == [(shards[0], 300 * KIB), (shards[1], 100 * KIB)] and thread.bytes == 400 * KIB
    assert thread.began <= thread.ended


@pytest.mark.parametrize("how", ["sendfile", "read"])
def test_read_ahead_of_a_single_file_and_nothing_to_do(tmp_path, monkeypatch, how):
    """Read whole, in chunks, sent to /dev/null or (where sendfile is refused: macOS) read into a buffer."""
    file = _write(tmp_path / "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", 3 * 2**20 + 5)
    monkeypatch.setattr(checkpoint, "READ_AHEAD_CHUNK", 2**20)
    calls = []
    sendfile = os.sendfile

    def recorded(out, fd, offset, n):
        calls.append((offset, n))
        if how == "read":
            raise OSError(38, "not a socket")
        return sendfile(out, fd, offset, n)

    monkeypatch.setattr(os, "sendfile", recorded)
    thread = read_ahead(file, 2**40)
    thread.join(timeout=30)
    assert thread.read == {file: file.stat().st_size}
    chunks = [(i * 2**20, 2**20) for i in range(4)] + [(3 * 2**20 + 5, 2**20)]  # the last at the end: 0 bytes
    assert calls == (chunks if how == "sendfile" else chunks[:1])  # refused once: read from then on
    assert read_ahead(file, 0) is None and read_ahead(tmp_path / "empty-folder", 2**40) is None


def test_a_read_error_ends_the_read_ahead_quietly(tmp_path, monkeypatch):
    folder = tmp_path / "expert"
    (folder / "a.safetensors").mkdir(parents=True)  # open() fails: IsADirectoryError
    _write(folder / "b.safetensors", KIB)
    errors = []
    monkeypatch.setattr("threading.excepthook", errors.append)
    thread = read_ahead(folder, 2**40)
    thread.join(timeout=30)
    assert errors == [] and thread.bytes == 0 and thread.ended is not None


def test_a_read_ahead_waits_for_what_it_comes_after_and_can_be_cancelled(tmp_path):
    first, second = _write(tmp_path / "text.pth", 2 * 2**20), _write(tmp_path / "expert.safetensors", KIB)
    gate = threading.Event()
    a = read_ahead(first, 2**40)
    b = read_ahead(second, 2**40, after=(a, gate))
    a.join(timeout=30)
    time.sleep(0.2)
    assert b.is_alive() and b.began is None  # the event is not set yet
    opened = time.perf_counter()
    gate.set()
    b.join(timeout=30)
    assert b.began >= max(a.ended, opened) and b.read == {second: KIB}
    c = read_ahead(second, 2**40, after=(threading.Event(),))  # never set
    c.cancel()
    c.join(timeout=30)
    assert not c.is_alive() and c.read == {}


# ---------------------------------------------------------------------------------------------
# the pipeline: the text encoder's weights from its creation, the high expert's when a plan is applied


@pytest.fixture(scope="module")
def t2v_root(tmp_path_factory):
    return tiny_official_root(tmp_path_factory.mktemp("startup"))


RUN = dict(size=(48, 32), frames=5, steps=3, seed=5)
PROMPT = "a dog runs in snow"


@pytest.fixture(autouse=True)
def _available_memory(monkeypatch):
    """64 GB available, whatever else this machine runs: the read-ahead's room is decided from it (a test
    that wants it short sets it again)."""
    from wan_lite import t2v

    monkeypatch.setattr(t2v.psutil, "virtual_memory", lambda: SimpleNamespace(available=64 * GB))


def _pipe(root, cache, read_ahead_high: bool, prompts=()):
    from wan_lite.t2v import T2VPipeline

    pipe = T2VPipeline.from_pretrained(root, device="cpu", dtype=torch.float32, text_dtype=torch.float32,
                                       cache_dir=cache, prompts=prompts)
    pipe.read_ahead_high = read_ahead_high
    return pipe


def _expert_files(root) -> dict[str, list[Path]]:
    return {name: sorted((root / folder).glob("*.safetensors"))
            for name, folder in (("high", "high_noise_model"), ("low", "low_noise_model"))}


def _whole(files) -> dict[Path, int]:
    return {f: f.stat().st_size for f in files}


def test_a_planned_run_reads_the_high_expert_ahead_and_its_output_is_unchanged(t2v_root, tmp_path):
    files = _expert_files(t2v_root)
    off = _pipe(t2v_root, tmp_path / "cache-off", read_ahead_high=False)
    plan = off.make_plan(RUN["size"], RUN["frames"], vram_gb=24, ram_gb=64)
    assert plan.host.mode == "pinned" and plan.host.keep_between_runs
    ref = off(PROMPT, plan=plan, **RUN)
    assert off.read_ahead_thread is None and off.read_ahead_text is None

    pipe = _pipe(t2v_root, tmp_path / "cache-on", read_ahead_high=True)
    result = pipe(PROMPT, plan=plan, **RUN)
    first = pipe.read_ahead_thread
    first.join(timeout=30)
    assert first.read == _whole(files["high"])  # every shard, whole; no low
    assert_close_fp32(result.latents, ref.latents)  # the same path: the reads change no value
    assert_close_fp32(result.video, ref.video)

    again = pipe(PROMPT, plan=plan, **RUN)  # the high expert stayed in RAM: nothing read twice
    assert pipe.read_ahead_thread is first
    assert_close_fp32(again.latents, ref.latents)


def test_the_read_ahead_reads_what_the_memory_available_holds_beside_the_plans_peak(t2v_root, tmp_path,
                                                                                   monkeypatch):
    """Not the plan's private RAM budget (the page cache gets these pages in the first step anyway): what is
    available now, less the plan's private peak."""
    from wan_lite import t2v

    files = _expert_files(t2v_root)
    pipe = _pipe(t2v_root, tmp_path / "cache", read_ahead_high=True)
    plan = pipe.make_plan(RUN["size"], RUN["frames"], vram_gb=24, ram_gb=64)
    room = sum(f.stat().st_size for f in files["high"]) // 2
    available = int(plan.host.peak_gb * GB) + room
    monkeypatch.setattr(t2v.psutil, "virtual_memory", lambda: SimpleNamespace(available=available))
    pipe._apply(plan)
    pipe.read_ahead_thread.join(timeout=30)
    assert pipe.read_ahead_thread.bytes == room
    assert set(pipe.read_ahead_thread.read) <= set(files["high"])
    tight = dataclasses.replace(plan, host=dataclasses.replace(plan.host, ram_gb=plan.host.peak_gb))
    pipe.hosts = None
    pipe._apply(tight)  # no RAM budget to spare: the page cache is read ahead all the same
    pipe.read_ahead_thread.join(timeout=30)
    assert pipe.read_ahead_thread.bytes == room


def _loads_recorded(monkeypatch) -> list[float]:
    """TextEncoder.load wrapped: the times the weights were loaded."""
    from wan_lite.text import TextEncoder

    times, load = [], TextEncoder.load

    def recorded(self):
        loading = self.model is None  # encode calls it again: nothing to do then
        load(self)
        if loading:
            times.append(time.perf_counter())

    monkeypatch.setattr(TextEncoder, "load", recorded)
    return times


@pytest.mark.parametrize("room", ["both-fit", "short"])
def test_the_text_encoders_weights_are_read_first_then_the_high_experts(t2v_root, tmp_path, monkeypatch, room):
    """The prompts given: the encoder's file is read from the pipeline's creation, the high expert's only once
    it is read; and, where the page cache may not hold both (available memory short), once the encoder's
    weights are loaded. The output is the same as without any read-ahead."""
    from wan_lite import t2v

    files = _expert_files(t2v_root)
    ref = _pipe(t2v_root, tmp_path / "cache-ref", read_ahead_high=False)
    plan = ref.make_plan(RUN["size"], RUN["frames"], vram_gb=24, ram_gb=64)
    want = ref(PROMPT, plan=plan, **RUN)
    if room == "short":  # room for the expert, not for both
        text_file = t2v_root / "models_t5_umt5-xxl-enc-bf16.pth"
        available = int(plan.host.peak_gb * GB) + sum(_whole(files["high"]).values()) + text_file.stat().st_size // 2
        monkeypatch.setattr(t2v.psutil, "virtual_memory", lambda: SimpleNamespace(available=available))
    loaded = _loads_recorded(monkeypatch)
    pipe = _pipe(t2v_root, tmp_path / "cache", read_ahead_high=True, prompts=[PROMPT])
    text = pipe.read_ahead_text
    assert text is not None
    result = pipe(PROMPT, plan=plan, **RUN)
    high = pipe.read_ahead_thread
    text.join(timeout=30)
    high.join(timeout=30)
    assert text.read == _whole([t2v_root / "models_t5_umt5-xxl-enc-bf16.pth"])
    assert high.read == _whole(files["high"])
    assert high.began >= text.ended  # the disk read the encoder's weights first
    assert high.after == ((text,) if room == "both-fit" else (text, pipe._text_done))
    if room == "short":
        assert len(loaded) == 1 and high.began >= loaded[0]
    assert_close_fp32(result.latents, want.latents)


def test_a_cached_prompt_reads_no_text_encoder_and_the_expert_waits_for_nothing(t2v_root, tmp_path, monkeypatch):
    loaded = _loads_recorded(monkeypatch)
    warm = _pipe(t2v_root, tmp_path / "cache", read_ahead_high=False)
    plan = warm.make_plan(RUN["size"], RUN["frames"], vram_gb=24, ram_gb=64)
    warm(PROMPT, plan=plan, **RUN)  # fills the embedding cache
    assert len(loaded) == 1
    pipe = _pipe(t2v_root, tmp_path / "cache", read_ahead_high=True, prompts=[PROMPT])
    assert pipe.read_ahead_text is None
    result = pipe(PROMPT, plan=plan, **RUN)
    assert len(loaded) == 1 and pipe.read_ahead_thread.after == ()  # no encoder loaded, none waited for
    assert {"apply", "text_load", "text_encode", "first_step_staging_wait"} <= set(result.parts)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("room", ["both-fit", "short"])
def test_on_the_gpu_the_encoder_is_read_first_and_the_video_is_unchanged(t2v_root, tmp_path, monkeypatch, room):
    """The planned one-GPU path (the encoder on the GPU; the residency's compiled blocks): with the read-aheads
    the high expert's read begins after the encoder's ended (and after its weights reached the GPU where the
    page cache may not hold both), the run's parts include the first step's, and the latents are those of the
    run without read-ahead (the same kernels on the same card; fp32 tolerance)."""
    from wan_lite import t2v

    def pipe(prompts, cache):
        return t2v.T2VPipeline.from_pretrained(t2v_root, device="cuda", dtype=torch.float32,
                                               text_dtype=torch.float32, cache_dir=tmp_path / cache, prompts=prompts)

    ref = pipe((), "cache-ref")
    ref.read_ahead_high = False
    plan = ref.make_plan(RUN["size"], RUN["frames"], vram_gb=24, ram_gb=64, one_run=True)
    want = ref(PROMPT, plan=plan, **RUN)
    if room == "short":  # room for the expert, not for both
        text_file = t2v_root / "models_t5_umt5-xxl-enc-bf16.pth"
        high = sum(_whole(_expert_files(t2v_root)["high"]).values())
        available = int(plan.host.peak_gb * GB) + high + text_file.stat().st_size // 2
        monkeypatch.setattr(t2v.psutil, "virtual_memory", lambda: SimpleNamespace(available=available))
    loaded = _loads_recorded(monkeypatch)
    on = pipe([PROMPT], "cache-on")
    got = on(PROMPT, plan=plan, **RUN)
    text, high = on.read_ahead_text, on.read_ahead_thread
    text.join(timeout=30)
    high.join(timeout=30)
    assert text.bytes > 0 and high.read == _whole(_expert_files(t2v_root)["high"])
    assert high.began >= text.ended
    if room == "short":
        assert high.began >= loaded[0]
    assert {"apply", "text_load", "text_encode", "first_step_staging_wait"} <= set(got.parts)
    assert ("first_step_compile" in got.parts) == plan.compile
    assert_close_fp32(got.latents, want.latents)


# ---------------------------------------------------------------------------------------------
# one compiled graph for all blocks


def _hosts(cfg) -> tuple[HostExpert, HostExpert]:
    """(high, low) random experts of `cfg` in host buffers."""
    out = []
    for seed in (0, 1):
        model = template(cfg, torch.float32).to_empty(device="cpu")
        g = torch.Generator().manual_seed(seed)
        for t in model.state_dict().values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
        out.append(HostExpert.from_module(model, pin=False))
    return out[0], out[1]


@pytest.mark.parametrize("resolve_first", [True, False], ids=["attention-resolved-first", "resolved-in-the-trace"])
def test_one_compiled_graph_serves_every_block(monkeypatch, resolve_first):
    """The kernel choice resolved before the first compiled call (`Residency._skeleton`): Block.forward is
    compiled once for every block of both experts. Resolved inside block 0's trace instead (how it was),
    block 1 compiled again. Dynamo with the eager backend: the guards and the graph count are Dynamo's
    (Inductor's C++ build would only add minutes here); the outputs are the uncompiled residency's."""
    from torch._dynamo.utils import counters

    from wan_lite import attention

    cfg = ModelConfig.tiny(num_layers=4)
    hosts = _hosts(cfg)
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 7, cfg.text_dim, generator=g)

    def run(res: Residency) -> list[torch.Tensor]:
        with torch.no_grad():
            return [res.high(x, torch.tensor([900.0]), ctx), res.low(x, torch.tensor([500.0]), ctx)]

    ref = run(Residency(template(cfg, torch.float32), *hosts, device="cpu"))
    monkeypatch.setattr(residency, "compile_blocks", lambda m: [b.compile(backend="eager") for b in m.blocks])
    if not resolve_first:
        monkeypatch.setattr(residency, "attention", SimpleNamespace(resolved=lambda device: None))
    attention.set_backend(None)  # an empty kernel cache, as after a plan is applied
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = Residency(template(cfg, torch.float32), *hosts, device="cpu", compile=True)
        out = run(compiled)
        compiles = counters["frames"]["ok"]
    finally:
        torch._dynamo.reset()
    assert compiles == (1 if resolve_first else 2)
    assert compiled.stats.compile_s > 0  # the first compiled block's first call, for --stats
    for got, want in zip(out, ref):
        assert_close_fp32(got, want)


# ---------------------------------------------------------------------------------------------
# imports


def test_a_run_of_one_process_does_not_import_fsdp():
    """torch.distributed.fsdp (1.2 s of start-up here) is imported only where several ranks use it."""
    assert _python("import sys, wan_lite.t2v, wan_lite.generate; print('torch.distributed.fsdp' in sys.modules)"
                   ).strip() == "False"


def test_diffusers_loads_for_the_decode_not_before_the_text_phase(t2v_root, tmp_path):
    """The pipeline's checks (the VAE's names against `vae.official_names`), the plan and the text encoder run
    without diffusers (1.2 s of imports here, with the bitsandbytes it imports, which looks up the hub); the
    decode imports it."""
    code = f"""
import sys, torch
from wan_lite.t2v import T2VPipeline
from wan_lite.text import TextEncoder
seen = []
encode = TextEncoder.encode
TextEncoder.encode = lambda self, prompts: (seen.append('diffusers' in sys.modules), encode(self, prompts))[1]
pipe = T2VPipeline.from_pretrained({str(t2v_root)!r}, device="cpu", dtype=torch.float32, text_dtype=torch.float32,
                                   cache_dir={str(tmp_path / "cache")!r}, prompts=["a dog"])
plan = pipe.make_plan((48, 32), 5, vram_gb=24, ram_gb=64)
seen.append('diffusers' in sys.modules)
pipe("a dog", size=(48, 32), frames=5, steps=1, seed=1, plan=plan)
seen.append('diffusers' in sys.modules)
print(seen)
"""
    assert _python(code).strip().splitlines()[-1] == "[False, False, True]"


def test_stats_show_the_start_up_and_the_text_phase_by_part(t2v_root, tmp_path):
    """generate --stats: the start-up's parts (arguments, imports, the pipeline and its checks, LoRAs), the text
    phase's (plan applied, weights loaded, encoding), and the text encoder's read-ahead window."""
    from wan_lite.generate import main

    stats = tmp_path / "run.stats.json"
    assert main(["--ckpt", str(t2v_root), "--prompt", "a cat walks", "--size", "48x32", "--frames", "5", "--steps", "2",
                 "--device", "cpu", "--dtype", "fp32", "--vae-tile", "0", "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "v.mp4"), "--stats", str(stats)]) == 0
    got = json.loads(stats.read_text())
    parts = got["parts_s"]
    assert {"checks", "imports", "pipeline", "open_root", "check_text", "tokenizer", "check_vae", "loras", "apply",
            "text_load", "text_encode"} <= set(parts)
    assert all(v >= 0 for v in parts.values())
    assert parts["open_root"] + parts["check_text"] + parts["check_vae"] <= parts["pipeline"]
    began = got["parts_began_s"]
    assert began["open_root"] <= began["check_text"] <= began["check_vae"] <= began["text_load"] <= began["text_encode"]
    text = got["read_ahead_s"]["text"]
    assert 0 <= text["began"] <= text["ended"] <= got["first_step_done_s"] and text["gb"] > 0
    assert "high" not in got["read_ahead_s"]  # no plan on the CPU: nothing read ahead for the experts

    stats_off = tmp_path / "off.stats.json"
    assert main(["--ckpt", str(t2v_root), "--prompt", "a cat runs", "--size", "48x32", "--frames", "5", "--steps", "2",
                 "--device", "cpu", "--dtype", "fp32", "--vae-tile", "0", "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "w.mp4"), "--stats", str(stats_off), "--no-read-ahead"]) == 0
    assert json.loads(stats_off.read_text())["read_ahead_s"] == {}
