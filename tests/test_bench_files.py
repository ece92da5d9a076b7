"""wan_lite.bench_files on the CPU, tiny model: every kind of file is read by the runtime and holds the
values it was written with (GGUF blocks checked with gguf's own dequantize), the loading and host
placement of the bench, the baseline ratios, and the suite's orchestration (a CPU stand-in for the
CUDA-only `bench_ours` that runs the residency for real)."""

from __future__ import annotations

import json
import math
import sys
import time
from argparse import Namespace

import numpy as np
import pytest
import torch
from tolerance import assert_close_fp32, rel_error

from wan_lite import attention
from wan_lite import bench_files as bf
from wan_lite.checkpoint import load_expert, load_source, open_expert
from wan_lite.config import ModelConfig
from wan_lite.formats import open_expert_file
from wan_lite.keys import CheckpointError
from wan_lite.residency import Residency

CFG = ModelConfig.tiny()
RUN_SCHEME = {"ours-int8": "int8", "ours-fp8": "fp8", "fp8-scaled": "fp8", "gguf-q8_0": "int8", "gguf-q4_k_m": "int8"}
FAMILY = {"ours-int8": "ours", "ours-fp8": "ours", "fp8-scaled": "fp8-file", "gguf-q8_0": "gguf", "gguf-q4_k_m": "gguf"}


def tiny_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, CFG.in_dim, 2, 4, 6, generator=g)  # (B, C, F, H, W)
    return x, torch.tensor([900.0]), torch.randn(1, 7, CFG.text_dim, generator=g)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """kind -> (path, {stored name: float32 value written})."""
    root = tmp_path_factory.mktemp("bench_files")
    out = {}
    for kind in bf.KINDS:
        keep = {}
        path = bf.write_expert(kind, root / (kind + bf.SUFFIX.get(kind, "")), CFG, seed=3, keep=keep)
        out[kind] = (path, keep)
    return out


# ---------------------------------------------------------------------------------------------
# the files


@pytest.mark.parametrize("kind", bf.KINDS)
def test_each_kind_opens_loads_and_runs(written, kind):
    path, _ = written[kind]
    assert not list(path.parent.glob(".*.tmp"))  # written under a temporary name, renamed when complete
    assert bf.family(path) == FAMILY[kind]
    source = bf.open_as_runtime(path)
    assert source.config == CFG and source.scheme == RUN_SCHEME[kind]
    assert len(source.linears) == 10 * CFG.num_layers  # every block Linear 8-bit, as the GPU runs it
    x, t, ctx = tiny_inputs()
    for model in (load_source(source, dtype=torch.float32), load_expert(path, dtype=torch.float32)):
        with torch.no_grad():
            y = model(x, t, ctx)
        assert y.shape == x.shape and torch.isfinite(y).all() and y.abs().max() > 0


@pytest.mark.parametrize("kind", ["ours-int8", "ours-fp8"])
def test_folder_holds_the_written_values(written, kind):
    path, keep = written[kind]
    source = open_expert(path)
    assert sorted(source.names()) == sorted(keep)
    for name in source.names():
        got = source.tensor(name)
        assert list(got.shape) == list(keep[name].shape), name
        assert torch.equal(got.float(), keep[name]), name
    meta = json.loads((path / "wan_lite_quant.json").read_text())
    assert meta["scheme"] == RUN_SCHEME[kind] and meta["config"]["num_layers"] == CFG.num_layers
    # weight std ~ 1/sqrt(K): q * scale of one layer
    w = source.tensor("blocks.0.ffn.0.weight").float() * source.tensor("blocks.0.ffn.0.weight_scale")[:, None]
    assert 0.5 < w.std().item() * math.sqrt(CFG.dim) < 2


def test_fp8_scaled_holds_the_written_values(written):
    path, keep = written["fp8-scaled"]
    source = open_expert_file(path)  # as stored: e4m3 weights, the scalar scale broadcast per channel
    assert source.info.scheme == "fp8-scaled"
    for name in source.names():
        layer, _, leaf = name.rpartition(".")
        got = source.tensor(name)
        if layer in source.linears and leaf == "weight":
            assert got.dtype == torch.float8_e4m3fn and torch.equal(got.float(), keep[name])
        elif layer in source.linears and leaf == "weight_scale":
            assert torch.equal(got, keep[layer + ".scale_weight"].expand(got.shape[0]))
        else:
            assert torch.equal(got.float(), keep[name]), name


@pytest.mark.parametrize("kind,ggml", [("gguf-q8_0", "Q8_0"), ("gguf-q4_k_m", "Q4_K")])
def test_gguf_blocks_match_gguf_dequantize(written, kind, ggml):
    """The bytes in the file, decoded by gguf's own dequantize, are the values the writer meant; the
    reader gives them back in the torch shape (comfy.gguf.orig_shape where the file stores it reshaped)."""
    import gguf

    path, keep = written[kind]
    reader = gguf.GGUFReader(path)
    assert bytes(reader.get_field("general.architecture").parts[-1]).decode() == "wan"
    types = {}
    for t in reader.tensors:
        types[t.name] = t.tensor_type.name
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(keep[t.name].shape)
        assert_close_fp32(torch.from_numpy(np.ascontiguousarray(values)).float(), keep[t.name])
    linears = [n for n in types if bf._block_linear(n)]
    assert linears and all(types[n] == ggml for n in linears)
    assert types["blocks.0.modulation"] == "F32" and types["time_embedding.0.weight"] == "F32"
    assert types["blocks.0.norm3.weight"] == "F32" and types["time_projection.1.weight"] == "F16"
    assert types["patch_embedding.weight"] == "F16"
    shape = reader.get_field("comfy.gguf.orig_shape.patch_embedding.weight")
    assert shape.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]  # what ComfyUI-GGUF's loader reads
    assert [int(shape.parts[i][0]) for i in shape.data] == [CFG.dim, CFG.in_dim, *CFG.patch_size]
    source = open_expert_file(path)  # scheme None: every tensor dequantized to float32
    for name in source.names():
        assert_close_fp32(source.tensor(name).float(), keep[name])


@pytest.mark.parametrize("qtype", ["q8_0", "q4_k"])
def test_blocks_at_a14b_width(qtype):
    """At the real row length (K = 5120): gguf decodes the blocks to the values meant, weights ~ 1/sqrt(K)."""
    import gguf

    k, rows = 5120, 8
    per = bf.QK8_0 if qtype == "q8_0" else bf.QK_K
    maker = bf.random_q8_0 if qtype == "q8_0" else bf.random_q4_k
    blocks, values = maker(rows * k // per, k, torch.Generator().manual_seed(0), "cpu", values=True)
    assert blocks.shape == (rows * k // per, bf.BLOCK_BYTES[qtype])
    assert bf.BLOCK_BYTES[qtype] == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype.upper()]][1]
    decoded = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[qtype.upper()])  # (n, per)
    assert_close_fp32(torch.from_numpy(decoded), values)
    w = values.reshape(rows, k)
    assert 0.7 < w.std().item() * math.sqrt(k) < 1.4 and abs(w.mean().item()) * math.sqrt(k) < 0.2


def test_a14b_plans():
    """Full-size files: every block Linear quantized in place (rows are whole blocks), sizes as the formats say."""
    cfg = ModelConfig.a14b()
    block_params = 40 * (8 * 5120 * 5120 + 2 * 5120 * 13824)
    for kind in ("gguf-q8_0", "gguf-q4_k_m"):
        plan = bf.plan_kind(kind, cfg)
        assert [s.name for s in plan if s.orig] == ["patch_embedding.weight"]
        quantized = [s for s in plan if s.fmt in bf.BLOCK_BYTES]
        assert len(quantized) == 400 and sum(s.numel for s in quantized) == block_params
    assert sum(s.nbytes for s in bf.plan_kind("gguf-q4_k_m", cfg) if s.fmt == "q4_k") == block_params // 256 * 144
    sizes = {kind: bf.kind_bytes(kind, cfg) / 1e9 for kind in bf.KINDS}
    assert 14.5 < sizes["ours-int8"] == sizes["ours-fp8"] < 15.5
    assert 14.0 < sizes["fp8-scaled"] < sizes["ours-int8"] < sizes["gguf-q8_0"] < 15.6
    assert 8.0 < sizes["gguf-q4_k_m"] < 8.8


def test_write_cli(tmp_path, capsys):
    out = tmp_path / "one.gguf"
    assert bf.main(["write", "--kind", "gguf-q4_k_m", "--out", str(out), "--config", "tiny", "--layers", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert open_expert(out).config == ModelConfig.tiny(num_layers=1)
    with pytest.raises(ValueError, match="unknown kind"):
        bf.write_expert("gguf-q2_k", tmp_path / "x.gguf", CFG)
    assert not list(tmp_path.glob("x*"))


@pytest.mark.parametrize("kind", [k for k in bf.KINDS if k.startswith("gguf")])
def test_gguf_kind_without_gguf_is_one_line_naming_the_install(tmp_path, monkeypatch, capsys, kind):
    monkeypatch.setitem(sys.modules, "gguf", None)  # as uninstalled: find_spec gives None, import raises
    out = tmp_path / "out" / "one.gguf"
    assert bf.main(["write", "--kind", kind, "--out", str(out), "--config", "tiny"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1  # one line, no traceback
    assert captured.err == ("error: writing GGUF files needs the gguf package: pip install 'wan-lite[gguf]' "
                            "(or pip install gguf)\n")
    assert bf.main(["suite", "--dir", str(tmp_path / "suite"), "--kinds", f"ours-int8,{kind}"]) == 2
    assert capsys.readouterr().err == captured.err  # the suite too, before its GPU check
    with pytest.raises(CheckpointError, match=r"pip install gguf\)$"):  # the library call, the same message
        bf.write_expert(kind, out, CFG)
    with pytest.raises(CheckpointError, match=r"pip install gguf\)$"):  # the suite called from Python
        bf.suite(tmp_path / "suite", kinds=("ours-int8", kind), cfg=CFG)
    assert list(tmp_path.iterdir()) == []  # refused before any work: no folder, no temporary file
    with pytest.raises(CheckpointError, match="^reading GGUF files needs the gguf package"):  # the runtime's
        bf.require_gguf()


# ---------------------------------------------------------------------------------------------
# loading and placing as the runtime does


def test_parallel_fill_equals_the_runtime_fill(written):
    path, _ = written["gguf-q4_k_m"]
    _, (h1, l1), r1 = bf.load_pair(path, path, in_ram=(True, True), threads=1)
    _, (h3, l3), r3 = bf.load_pair(path, path, in_ram=(True, True), threads=3)
    assert r1["shared"] and l1 is h1 and l3 is h3 and set(r1["fill"]) == {"high"}
    for unit, lay in h1.layouts.items():  # every tensor (the alignment gaps between them are never written)
        one, three = lay.views(h1.flats[unit]), lay.views(h3.flats[unit])
        assert all(torch.equal(one[n], three[n]) for n in one), unit  # the same pack, on the same bytes
    assert r3["fill"]["high"]["threads"] == 3 and r3["load_one_thread_s"] > 0
    # a mapped low expert is not shared and not filled: served from its file
    _, (h, lo), r = bf.load_pair(path, path, in_ram=(True, False), threads=2)
    assert not r["shared"] and lo is not h and lo.flats is None and r["placement"] == {"high": "ram", "low": "file"}


def test_shared_host_serves_both_experts(written):
    """One file as both experts: the residency copies the units for the low expert too, same weights."""
    path, _ = written["ours-int8"]
    template, hosts, record = bf.load_pair(path, path, in_ram=(True, True))
    assert record["shared"]
    res = Residency(template, *hosts, device="cpu", mode="resident")
    x, t, ctx = tiny_inputs()
    high = res.high(x.bfloat16(), t, ctx.bfloat16())
    low = res.low(x.bfloat16(), t, ctx.bfloat16())
    assert res.where()["low"] and not res.where()["high"]  # the low expert's units were copied in
    assert_close_fp32(low.float(), high.float())  # the same weights through the same residency slots
    assert torch.isfinite(high).all()
    with torch.no_grad():
        ref = load_source(bf.open_as_runtime(path), dtype=torch.bfloat16)(x.bfloat16(), t, ctx.bfloat16())
    assert rel_error(high.float(), ref.float()) < 2e-2  # bf16 on both paths, different memory


def cpu_run(template, hosts, *, height, width, frames, mode, cfg_batched, vram_gb, steps, label, compile_blocks=False,
            ffn_chunk=None):
    """A CPU stand-in for bench.bench_ours with its record's keys: one real call of each expert through the
    residency on tiny inputs, timed; peak VRAM and the stall are zero here."""
    res = Residency(template, *hosts, device="cpu", mode=mode)
    x, t, ctx = tiny_inputs()
    times = {}
    for name, expert in (("high", res.high), ("low", res.low)):
        start = time.perf_counter()
        y = expert(x.bfloat16(), t, ctx.bfloat16())
        times[name] = time.perf_counter() - start
    res.release()
    return {"label": label, "width": width, "height": height, "mode": mode, "high_step_s": times["high"],
            "low_step_s": times["low"], "denoise_total_s": 26 * times["high"] + 14 * times["low"],
            "swap_stall_ms": 0.0, "peak_allocated_gb": 0.0, "peak_reserved_gb": 0.0,
            "finite": bool(torch.isfinite(y).all()), "host_memory": {"private_gb": 1.0, "file_gb": 0.0}}


def test_bench_pairs_and_ratios(written):
    records = []
    try:
        for kind in ("gguf-q8_0", "ours-int8", "fp8-scaled", "ours-fp8"):
            path, _ = written[kind]
            bf.bench_pair(kind, path, path, resolutions=["480p"], vram_gb=24.0, record=records.append, run=cpu_run,
                          compile_blocks=False)
    finally:
        attention.set_backend(None)
    runs = {r["pair"]: r for r in records if r["record"] == "run"}
    pairs = {r["pair"]: r for r in records if r["record"] == "pair"}
    assert set(runs) == set(pairs) == {"gguf-q8_0", "ours-int8", "fp8-scaled", "ours-fp8"}
    assert all(r["finite"] and r["shared"] for r in runs.values())
    assert pairs["gguf-q8_0"]["scheme"] == "int8" and pairs["fp8-scaled"]["scheme"] == "fp8"
    assert pairs["ours-int8"]["host_plan"] == "pinned" and pairs["ours-int8"]["host_peak"]["private_gb"] > 0
    compared = {r["pair"]: r for r in bf.compare(records)}
    g, b = compared["gguf-q8_0"], runs["ours-int8"]  # the baseline may come later in the run: still found
    assert g["vs"]["baseline"] == "ours-int8" and g["goal"] == 0.9
    assert g["vs"]["total"] == pytest.approx(b["denoise_total_s"] / g["denoise_total_s"])
    assert compared["fp8-scaled"]["vs"]["baseline"] == "ours-fp8" and compared["fp8-scaled"]["goal"] == 0.97
    assert compared["ours-fp8"]["vs"]["total"] == 1.0 and compared["ours-fp8"]["goal"] is None
    text = bf.table(records)
    assert text.count("\n") == 2 + 4 - 1 and "(ours-int8)" in text and "pinned, shared" in text


def test_suite_writes_benches_and_deletes(tmp_path):
    out = tmp_path / "suite.json"
    data = bf.suite(tmp_path / "files", kinds=("ours-int8", "gguf-q8_0"), resolutions=("480p",), cfg=CFG,
                    json_path=out, run=cpu_run, compile_blocks=False)
    attention.set_backend(None)
    assert not list((tmp_path / "files").iterdir())  # deleted after use
    saved = json.loads(out.read_text())
    kinds = [(r["record"], r.get("kind") or r.get("pair")) for r in saved["records"]]
    assert kinds == [("write", "ours-int8"), ("run", "ours-int8"), ("pair", "ours-int8"),
                     ("write", "gguf-q8_0"), ("run", "gguf-q8_0"), ("pair", "gguf-q8_0")]
    assert "gguf-q8_0" in saved["table"] and data["suite"]["expected_s"] > 0
    late = bf.suite(tmp_path / "files", kinds=("ours-int8",), resolutions=("480p",), cfg=CFG, run=cpu_run,
                    time_limit=0)
    assert [r.get("skipped", "")[:10] for r in late["records"]] == ["time limit"]


def test_estimate_of_the_default_suite():
    total, lines = bf.estimate_suite(bf.KINDS, ModelConfig.a14b(), ("480p", "720p"), steps=1, threads=16)
    assert len(lines) == len(bf.KINDS) + 1 and 300 < total < 900


def test_pair_arguments(tmp_path):
    f = tmp_path / "a.gguf"
    f.write_bytes(b"")
    assert bf.parse_pairs([f"q8={f},{f}"]) == [("q8", f, f)]
    for bad, msg in ((f"q8={f}", "LABEL=HIGH,LOW"), (f"q8={f},{tmp_path}/b.gguf", "does not exist"),
                     ("=a,b", "LABEL=HIGH,LOW")):
        with pytest.raises(ValueError, match=msg):
            bf.parse_pairs([bad])
    with pytest.raises(ValueError, match="used twice"):
        bf.parse_pairs([f"q8={f},{f}", f"q8={f},{f}"])
    args = Namespace(pairs=None, high=str(f), low=None, label="x")
    assert bf.run_pairs(args) == 2  # --high without --low, refused before anything loads
