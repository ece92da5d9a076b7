"""Several ranks (wan_lite.parallel) against one process: 2 gloo processes on the CPU, tiny random experts.

One spawn runs every grid (Ulysses, Ulysses + FSDP2, CFG parallel, CFG + FSDP2) and saves each rank's
outputs; the tests compare them with the plain single-process model, fp32, rel < 1e-5. The latents of
the "pad" case give 9 tokens, so the 2-rank sequence is padded to 10; "even" gives 8 (no padding).
"""

from __future__ import annotations

import json
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from quant.convert import convert_checkpoint
from wan_lite import SamplingConfig, bench_parallel, parallel, sample
from wan_lite.attention import attention
from wan_lite.checkpoint import CheckpointError, find_experts, load_expert
from wan_lite.config import ModelConfig
from wan_lite.model import WanModel
from wan_lite.pipeline import guided_velocity

WORLD = 2
TOL = 1e-5
HIGH_SEED, LOW_SEED = 11, 12
GRIDS = ("ulysses", "ulysses-fsdp", "cfg", "cfg-fsdp")
# (B, F, H, W) of the latents, context length, timesteps
CASES = {"pad": ((2, 3, 2, 6), 7, (999.0, 500.0)), "even": ((1, 2, 4, 4), 512, (877.0,))}
SAMPLING = SamplingConfig(steps=4)  # shift 12: 2 high-noise and 2 low-noise steps
NOISE = (1, 16, 3, 2, 6)  # 9 tokens


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_expert(seed: int) -> WanModel:
    """The tiny model with every parameter random, the same on every rank."""
    torch.manual_seed(seed)
    model = WanModel(ModelConfig.tiny())
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model.eval().requires_grad_(False)


def case_inputs(case: str):
    (b, f, h, w), ctx_len, timesteps = CASES[case]
    g = torch.Generator().manual_seed(3)
    cfg = ModelConfig.tiny()
    x = torch.randn(b, cfg.in_dim, f, h, w, generator=g)
    context = torch.randn(b, ctx_len, cfg.text_dim, generator=g)
    context_null = torch.randn(b, 5, cfg.text_dim, generator=g)  # another length, as a negative prompt has
    return x, torch.tensor(timesteps), context, context_null


def sample_inputs():
    g = torch.Generator().manual_seed(4)
    text_dim = ModelConfig.tiny().text_dim
    noise = torch.randn(NOISE, generator=g)
    return noise, torch.randn(1, 6, text_dim, generator=g), torch.randn(1, 3, text_dim, generator=g)


def qkv_inputs():
    g = torch.Generator().manual_seed(5)
    return tuple(torch.randn(2, 4, 5, 8, generator=g) for _ in range(3))  # (B, H, L=5, D): padded to 6


# ---------------------------------------------------------------------------------------------
# the ranks


def _worker(rank: int, port: int, checkpoint: str, quantized: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    grids = {"ulysses": parallel.setup_from_env("ulysses", fsdp=False)}
    grids["ulysses-fsdp"] = parallel.init_parallel("ulysses", fsdp=True)
    grids["cfg"] = parallel.init_parallel("cfg", fsdp=False)
    grids["cfg-fsdp"] = parallel.init_parallel("cfg", fsdp=True)
    out = {"sizes": {name: (g.cfg_size, g.sp_size, g.cfg_rank, g.sp_rank) for name, g in grids.items()}}
    out["from_main"] = grids["cfg"].from_main((torch.arange(3) if rank == 0 else None, "seed 7" if rank == 0 else ""))
    with torch.no_grad():
        q, k, v = qkv_inputs()  # the whole sequence; this rank keeps tokens 3r..3r+2 of the padded 6
        shard = [torch.nn.functional.pad(t, (0, 0, 0, 1))[:, :, 3 * rank : 3 * rank + 3] for t in (q, k, v)]
        out["attention"] = parallel.ulysses_attention(*shard, group=grids["ulysses"].mesh.get_group("sp"),
                                                      seq_len=5, inner=attention)
        for name, grid in grids.items():
            high, low = parallel.wrap_experts(tiny_expert(HIGH_SEED), tiny_expert(LOW_SEED), grid)
            for case in CASES:
                x, t, context, context_null = case_inputs(case)
                out[f"{name}/forward/{case}"] = high(x, t, context)
                out[f"{name}/guided/{case}"] = high.guided(x, t, context, context_null, 4.0)
            out[f"{name}/sample"] = sample(high, low, *sample_inputs(), SAMPLING)
            out[f"{name}/numel"] = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel()
                                       for p in high.parameters())
        loaded = parallel.load_parallel_expert(checkpoint, grids["ulysses-fsdp"], dtype=torch.float32)
        x, t, context, _ = case_inputs("pad")
        out["load-fsdp/forward"] = loaded(x, t, context)
        loaded = parallel.load_parallel_expert(checkpoint, grids["cfg"], dtype=torch.float32)
        out["load-replicated/forward"] = loaded(x, t, context)
        out["load-int8-replicated/forward"] = parallel.load_parallel_expert(quantized, grids["ulysses"])(x, t, context)
        try:
            parallel.load_parallel_expert(quantized, grids["ulysses-fsdp"])
        except CheckpointError as e:
            out["load-int8-fsdp/error"] = str(e)
    with torch.inference_mode():
        out["inference-mode/forward"] = loaded(x, t, context)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _bench_worker(rank: int, port: int, out_json: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    bench_parallel.main(["--tiny", "--repeats", "1", "--json", out_json])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, official_root):
    """Each rank's saved outputs, one dict per rank."""
    out_dir = tmp_path_factory.mktemp("parallel")
    quantized = convert_checkpoint(official_root.root, tmp_path_factory.mktemp("int8") / "root", "int8", progress=False)
    mp.spawn(_worker, args=(free_port(), str(official_root.high), str(find_experts(quantized)[0]), str(out_dir)),
             nprocs=WORLD)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


# ---------------------------------------------------------------------------------------------
# tests


def test_grids(ranks):
    for rank, out in enumerate(ranks):
        assert out["sizes"]["ulysses"] == (1, 2, 0, rank)
        assert out["sizes"]["cfg"] == (2, 1, rank, 0)


def test_from_main(ranks):
    for out in ranks:
        assert torch.equal(out["from_main"][0], torch.arange(3)) and out["from_main"][1] == "seed 7"


def test_ulysses_attention_drops_padding(ranks):
    q, k, v = qkv_inputs()
    ref = torch.nn.functional.pad(attention(q, k, v, backend="sdpa-math"), (0, 0, 0, 1))  # (B, H, 6, D)
    for rank, out in enumerate(ranks):
        assert rel_err(out["attention"], ref[:, :, 3 * rank : 3 * rank + 3]) < TOL
    assert ranks[1]["attention"][:, :, 2].abs().max() == 0  # the padded query's row


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_guided_match_one_process(ranks, grid, case):
    model = tiny_expert(HIGH_SEED)
    x, t, context, context_null = case_inputs(case)
    with torch.no_grad():
        ref = model(x, t, context)
        ref_guided = guided_velocity(model, x, t, context, context_null, 4.0)
    for out in ranks:
        assert out[f"{grid}/forward/{case}"].dtype == torch.float32
        assert rel_err(out[f"{grid}/forward/{case}"], ref) < TOL
        assert rel_err(out[f"{grid}/guided/{case}"], ref_guided) < TOL


@pytest.mark.parametrize("grid", GRIDS)
def test_sample_matches_one_process(ranks, grid):
    with torch.no_grad():
        ref = sample(tiny_expert(HIGH_SEED), tiny_expert(LOW_SEED), *sample_inputs(), SAMPLING)
    for out in ranks:
        assert rel_err(out[f"{grid}/sample"], ref) < TOL
    assert torch.equal(ranks[0][f"{grid}/sample"], ranks[1][f"{grid}/sample"])  # ranks stay in lockstep


def test_fsdp_keeps_half_the_weights_per_rank(ranks):
    full = sum(p.numel() for p in tiny_expert(HIGH_SEED).parameters())
    for out in ranks:
        assert out["ulysses/numel"] == out["cfg/numel"] == full
        assert out["ulysses-fsdp/numel"] < 0.51 * full and out["cfg-fsdp/numel"] < 0.51 * full
    assert ranks[0]["ulysses-fsdp/numel"] + ranks[1]["ulysses-fsdp/numel"] == full


def test_checkpoint_streamed_into_shards_matches_load_expert(ranks, official_root):
    x, t, context, _ = case_inputs("pad")
    with torch.no_grad():
        ref = load_expert(official_root.high, dtype=torch.float32)(x, t, context)
    for out in ranks:
        for key in ("load-fsdp/forward", "load-replicated/forward", "inference-mode/forward"):
            assert rel_err(out[key], ref) < TOL, key


def test_quantized_expert_replicated_matches_load_expert(ranks, official_root, tmp_path):
    """With --no-fsdp every rank loads the 8-bit expert itself; FSDP refuses it with the way out."""
    x, t, context, _ = case_inputs("pad")
    quantized = convert_checkpoint(official_root.root, tmp_path / "root", "int8", progress=False)
    with torch.no_grad():
        ref = load_expert(find_experts(quantized)[0])(x, t, context)
    for out in ranks:
        assert rel_err(out["load-int8-replicated/forward"], ref) < 2e-2
        assert "--no-fsdp" in out["load-int8-fsdp/error"]


@pytest.mark.parametrize("world, mode", [(3, "ulysses"), (6, "ulysses"), (6, "cfg"), (3, "auto")])
def test_heads_must_divide(world, mode):
    with pytest.raises(ValueError, match="divide the model's 40 attention heads") as err:
        parallel.plan(mode, world)
    expected = "2, 4, 8, 10, 16, 20, 40, 80" if mode == "cfg" else "1, 2, 4, 5, 8, 10, 20, 40"
    assert expected in str(err.value)


def test_plan():
    assert parallel.plan("auto", 2) == (2, 1)
    assert parallel.plan("auto", 8) == (2, 4)
    assert parallel.plan("ulysses", 8) == (1, 8)
    assert parallel.plan("auto", 5) == (1, 5)
    with pytest.raises(ValueError, match="even number of ranks"):
        parallel.plan("cfg", 5)
    with pytest.raises(ValueError, match="unknown parallel mode"):
        parallel.plan("ring", 2)


def test_setup_from_env(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert parallel.setup_from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="in 1, 2, 4, 5, 8, 10, 20, 40"):
        parallel.setup_from_env("ulysses")  # refused before any process group starts
    assert not dist.is_initialized()


def test_expert_refuses_a_grid_that_splits_heads():
    with pytest.raises(ValueError, match="in 1, 2"):
        parallel.ParallelExpert(tiny_expert(HIGH_SEED), SimpleNamespace(sp_size=3, cfg_size=1))  # 2 heads


def test_bench_smoke(tmp_path):
    """`torchrun -m wan_lite.bench_parallel --tiny`: every mode runs and agrees with the single rank."""
    out = tmp_path / "bench.json"
    mp.spawn(_bench_worker, args=(free_port(), str(out)), nprocs=WORLD)
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == list(bench_parallel.MODES)
    assert all(r["rel_err"] < TOL for r in rows[1:])
