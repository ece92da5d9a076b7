"""Time to the first step (issue 14): the read-ahead of the high-noise expert's files (`checkpoint.read_ahead`,
started when the pipeline applies a plan), one compiled graph for every block, and no FSDP import in a run of
one process. posix_fadvise is mocked where the hints are checked: what the kernel then reads is its business
(measured by hand: BENCHMARKS.md / the report of issue 14)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from builders_t2v import tiny_official_root
from tolerance import assert_close_fp32

from wan_lite import checkpoint, residency
from wan_lite.checkpoint import READ_AHEAD_CHUNK, read_ahead
from wan_lite.config import ModelConfig
from wan_lite.planner import GB
from wan_lite.residency import HostExpert, Residency, template

KIB = 2**10


class Hints:
    """A stand-in for os.posix_fadvise: records (file, offset, length, advice), the file found by inode."""

    def __init__(self, files):
        self.by_inode = {Path(f).stat().st_ino: Path(f) for f in files}
        self.calls = []

    def __call__(self, fd, offset, length, advice):
        self.calls.append((self.by_inode.get(os.fstat(fd).st_ino), offset, length, advice))

    def bytes_per_file(self) -> dict[Path, int]:
        out = {}
        for file, _, length, _ in self.calls:
            out[file] = out.get(file, 0) + length
        return out


def _hints(monkeypatch, files) -> Hints:
    hints = Hints(files)
    monkeypatch.setattr(os, "posix_fadvise", hints)
    return hints


def _write(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


# ---------------------------------------------------------------------------------------------
# the helper


def test_read_ahead_hints_each_shard_in_chunks_up_to_the_budget(tmp_path, monkeypatch):
    """Sorted shards, contiguous WILLNEED hints of at most READ_AHEAD_CHUNK bytes (Linux reads no more of
    one hint than its read-ahead window), the first `max_bytes` only; config.json and the index untouched."""
    folder = tmp_path / "high_noise_model"
    shards = [_write(folder / f"diffusion_pytorch_model-0000{i}-of-00002.safetensors", n)
              for i, n in ((1, 300 * KIB), (2, 200 * KIB))]
    others = [_write(folder / name, 100) for name in ("config.json", "diffusion_pytorch_model.safetensors.index.json")]
    hints = _hints(monkeypatch, shards + others)
    read_ahead(folder, 400 * KIB).join(timeout=30)
    assert hints.bytes_per_file() == {shards[0]: 300 * KIB, shards[1]: 100 * KIB}
    assert all(advice == os.POSIX_FADV_WILLNEED and 0 < length <= READ_AHEAD_CHUNK
               for _, _, length, advice in hints.calls)
    for shard in shards:  # each file from its start, without gaps or overlaps
        spans = [(offset, length) for f, offset, length, _ in hints.calls if f == shard]
        assert [o for o, _ in spans] == [sum(n for _, n in spans[:i]) for i in range(len(spans))]


def test_read_ahead_of_a_single_file_and_nothing_to_do(tmp_path, monkeypatch):
    file = _write(tmp_path / "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", 3 * READ_AHEAD_CHUNK + 5)
    hints = _hints(monkeypatch, [file])
    read_ahead(file, 2**40).join(timeout=30)
    assert hints.bytes_per_file() == {file: file.stat().st_size} and len(hints.calls) == 4
    assert read_ahead(file, 0) is None and read_ahead(tmp_path / "empty-folder", 2**40) is None
    monkeypatch.delattr(os, "posix_fadvise")  # macOS, Windows: no hint, no thread
    assert read_ahead(file, 2**40) is None


def test_a_read_error_ends_the_hints_quietly(tmp_path, monkeypatch):
    file = _write(tmp_path / "expert.safetensors", READ_AHEAD_CHUNK)

    def failing(*_):
        raise OSError("EIO")

    monkeypatch.setattr(os, "posix_fadvise", failing)
    errors = []
    monkeypatch.setattr("threading.excepthook", errors.append)
    read_ahead(file, 2**40).join(timeout=30)
    assert errors == []


# ---------------------------------------------------------------------------------------------
# the pipeline starts it when a plan is applied


@pytest.fixture(scope="module")
def t2v_root(tmp_path_factory):
    return tiny_official_root(tmp_path_factory.mktemp("startup"))


RUN = dict(size=(48, 32), frames=5, steps=3, seed=5)


def _pipe(root, cache, read_ahead_high: bool):
    from wan_lite.t2v import T2VPipeline

    pipe = T2VPipeline.from_pretrained(root, device="cpu", dtype=torch.float32, text_dtype=torch.float32,
                                       cache_dir=cache)
    pipe.read_ahead_high = read_ahead_high
    return pipe


def _expert_files(root) -> dict[str, list[Path]]:
    return {name: sorted((root / folder).glob("*.safetensors"))
            for name, folder in (("high", "high_noise_model"), ("low", "low_noise_model"))}


def test_a_planned_run_reads_the_high_expert_ahead_and_its_output_is_unchanged(t2v_root, tmp_path, monkeypatch):
    files = _expert_files(t2v_root)
    hints = _hints(monkeypatch, files["high"] + files["low"])
    off = _pipe(t2v_root, tmp_path / "cache-off", read_ahead_high=False)
    plan = off.make_plan(RUN["size"], RUN["frames"], vram_gb=24, ram_gb=64)
    assert plan.host.mode == "pinned" and plan.host.keep_between_runs
    ref = off("a dog runs in snow", plan=plan, **RUN)
    assert hints.calls == [] and off.read_ahead_thread is None

    pipe = _pipe(t2v_root, tmp_path / "cache-on", read_ahead_high=True)
    result = pipe("a dog runs in snow", plan=plan, **RUN)
    pipe.read_ahead_thread.join(timeout=30)
    assert hints.bytes_per_file() == {f: f.stat().st_size for f in files["high"]}  # every shard, whole; no low
    assert_close_fp32(result.latents, ref.latents)  # the same path: the hints change no value
    assert_close_fp32(result.video, ref.video)

    calls = len(hints.calls)
    again = pipe("a dog runs in snow", plan=plan, **RUN)  # the high expert stayed in RAM: nothing read twice
    assert len(hints.calls) == calls
    assert_close_fp32(again.latents, ref.latents)


def test_the_read_ahead_stays_within_what_the_plan_leaves_of_its_ram_budget(t2v_root, tmp_path, monkeypatch):
    files = _expert_files(t2v_root)
    hints = _hints(monkeypatch, files["high"] + files["low"])
    pipe = _pipe(t2v_root, tmp_path / "cache", read_ahead_high=True)
    plan = pipe.make_plan(RUN["size"], RUN["frames"], vram_gb=24, ram_gb=64)
    spare = sum(f.stat().st_size for f in files["high"]) // 2  # of the budget, over the planned private peak
    plan = dataclasses.replace(plan, host=dataclasses.replace(plan.host, ram_gb=plan.host.peak_gb + spare / GB))
    pipe._apply(plan)
    pipe.read_ahead_thread.join(timeout=30)
    hinted = sum(hints.bytes_per_file().values())
    assert spare - 2 <= hinted <= spare  # GB as floats: within a byte or two
    assert set(hints.bytes_per_file()) <= set(files["high"])


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
        out = run(Residency(template(cfg, torch.float32), *hosts, device="cpu", compile=True))
        compiles = counters["frames"]["ok"]
    finally:
        torch._dynamo.reset()
    assert compiles == (1 if resolve_first else 2)
    for got, want in zip(out, ref):
        assert_close_fp32(got, want)


# ---------------------------------------------------------------------------------------------
# imports


def test_a_run_of_one_process_does_not_import_fsdp():
    """torch.distributed.fsdp (1.2 s of start-up here) is imported only where several ranks use it."""
    code = "import sys, wan_lite.t2v, wan_lite.generate; print('torch.distributed.fsdp' in sys.modules)"
    root = Path(checkpoint.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, check=True)
    assert out.stdout.strip() == "False"
