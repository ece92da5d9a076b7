"""One generation spread over N ranks of torch.distributed: Ulysses sequence parallel, CFG parallel, FSDP2.

Launch with `torchrun --nproc_per_node N -m wan_lite.generate ...`: `setup_from_env()` reads torchrun's
variables (None for a single process) and places the ranks on a (cfg, sp) grid. Only torch.distributed
collectives are used: NCCL on GPUs, gloo on the CPU (the tests).

- Ulysses sequence parallel (DeepSpeed-Ulysses, as the official `wan/distributed/`): each of the `sp` ranks
  of a group carries L/sp tokens of the video through every block. Before self-attention one
  `all_to_all_single` turns the q/k/v sequence shards into head shards (each rank: the whole sequence for
  H/sp heads), attention runs, and a second all-to-all turns the output back. Norms, cross-attention (full
  512-token context on every rank) and the FFN are per token: no communication. The sequence is
  zero-padded to a multiple of sp as in the official code; padded keys and queries are dropped after the
  all-to-all (the official code masks the keys), so padding never changes a real token. RoPE tables are
  sliced to the shard's global positions. sp must divide the 40 heads.
- CFG parallel: the two halves of the grid run the cond and the uncond pass at once, and one all-gather
  gives every rank `uncond + s * (cond - uncond)` in float32 (`ParallelExpert.guided`). No communication
  inside the forward, so it scales best; it needs `pipeline.guided_velocity` to call `.guided` (a plain
  `expert(x, t, context)` stays correct: both halves then compute the same pass). Guidance 1.0 (Lightning)
  is one cond pass on every rank and no all-gather: `guided_velocity` calls `expert(x, t, context)` and
  `.guided` does the same, so the uncond half duplicates the cond pass rather than idle or wait.
- FSDP2 (`fully_shard` over all ranks): each block, and the wrapper as root (embeddings, head), keeps 1/N of
  its weights; a block's weights are all-gathered just before it runs and freed after. Both experts then
  fit on each GPU together. `load_parallel_expert` streams a checkpoint into the shards: rank 0 reads one
  memory-mapped tensor at a time and scatters it (`distribute_tensor`), so host RAM never holds a whole
  expert, let alone one per rank; the others only read the metadata.

Every rank ends a call holding the full velocity, so `pipeline.sample` runs unchanged and identically on
every rank; only rank 0 needs to decode and write the video.

Measured (`python -m wan_lite.bench_parallel`, 2 x H100 80GB, torch 2.11, 720p 81 frames = 75,600 tokens,
one A14B expert in bf16, cuDNN attention): a denoising step (cond + uncond) takes 27.4 s on one GPU,
14.4 s with Ulysses (1.90x) and 13.8 s with CFG parallel (1.98x); FSDP2 halves the resident weights
(27.1 -> 13.6 GiB per GPU, peak 23.0 GiB with Ulysses) at no measurable cost in speed. Outputs were
bitwise equal to the single GPU's.

Deliberately unsupported: ring attention (sequence parallel beyond the head count), several hosts,
quantized experts under FSDP (wrap them replicated), weights in fp32 under NCCL (it works, but the point
of the runtime is bf16).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import CheckpointError, ModelRoot, expert_scheme, load_expert, open_expert
from .model import WanModel
from .pipeline import combine_guidance

# Device meshes, FSDP2 and DTensor are imported where several ranks use them (init_parallel, parallelize,
# load_parallel_expert): `torch.distributed.fsdp` took 1.2 s of every run's start-up here (python -X importtime,
# CPU, 2026-11-29), and a run of one process never uses it.
if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

MODES = ("auto", "ulysses", "cfg")
A14B_HEADS = 40

# ---------------------------------------------------------------------------------------------
# the grid of ranks


def plan(mode: str, world_size: int, num_heads: int = A14B_HEADS) -> tuple[int, int]:
    """(cfg_size, sp_size): how `world_size` ranks split between CFG halves and Ulysses sequence shards.

    "ulysses": (1, N); "cfg": (2, N/2); "auto": CFG parallel when N is even (no communication inside the
    forward), Ulysses over the rest.
    """
    if mode not in MODES:
        raise ValueError(f"unknown parallel mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "cfg" and world_size % 2:
        raise ValueError(f"CFG parallel splits the ranks into a cond and an uncond half: it needs an even number of "
                         f"ranks, got {world_size}; use --parallel ulysses, or an even --nproc_per_node")
    cfg_size = 2 if mode == "cfg" or (mode == "auto" and world_size % 2 == 0) else 1
    check_sp_size(world_size // cfg_size, num_heads, cfg_size)
    return cfg_size, world_size // cfg_size


def check_sp_size(sp: int, num_heads: int, cfg_size: int = 1) -> None:
    """Ulysses gives each of the sp ranks num_heads/sp whole heads: sp must divide the head count."""
    if num_heads % sp:
        valid = ", ".join(str(cfg_size * d) for d in range(1, num_heads + 1) if num_heads % d == 0)
        raise ValueError(f"Ulysses sequence parallel over {sp} ranks needs {sp} to divide the model's {num_heads} "
                         f"attention heads: run with a number of ranks (--nproc_per_node) in {valid}"
                         + (" (CFG parallel takes half of them)" if cfg_size > 1 else ""))


@dataclass(frozen=True)
class ParallelContext:
    """This rank's place in the (cfg, sp) grid, and the meshes the collectives run on."""

    mesh: DeviceMesh  # 2-D, dims ("cfg", "sp"); row = one CFG half, its ranks share the sequence
    fsdp_mesh: DeviceMesh | None  # 1-D over all ranks: weights sharded by FSDP2; None: replicated
    device: torch.device  # this rank's device (cuda:LOCAL_RANK, or cpu under gloo)

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return self.mesh.size()

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that decodes and writes the video."""
        return self.rank == 0

    @property
    def cfg_size(self) -> int:
        return self.mesh.size(0)

    @property
    def sp_size(self) -> int:
        return self.mesh.size(1)

    @property
    def cfg_rank(self) -> int:
        """0: this rank computes the cond pass, 1: the uncond pass (CFG parallel)."""
        return self.mesh.get_local_rank("cfg")

    @property
    def sp_rank(self) -> int:
        return self.mesh.get_local_rank("sp")

    def from_main(self, obj):
        """Rank 0's `obj` on every rank (pickled, so CPU tensors; other ranks may pass None). The seed, the
        noise and the prompt embeddings must be equal on all ranks, or their samplers drift apart; this
        also lets rank 0 alone run the text encoder (and write its cache)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]


def init_parallel(mode: str = "auto", *, device: torch.device | None = None, fsdp: bool = True,
                  num_heads: int = A14B_HEADS) -> ParallelContext:
    """The grid over an initialized default process group. `fsdp`: shard the weights (else replicate)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    cfg_size, sp = plan(mode, world, num_heads)
    device = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                        else torch.device("cpu"))
    mesh = init_device_mesh(device.type, (cfg_size, sp), mesh_dim_names=("cfg", "sp"))
    fsdp_mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("fsdp",)) if fsdp else None
    return ParallelContext(mesh, fsdp_mesh, device)


def setup_from_env(mode: str = "auto", *, fsdp: bool = True, num_heads: int = A14B_HEADS) -> ParallelContext | None:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on cuda:LOCAL_RANK, else gloo) and
    return the grid; None for a single process. The rank count is checked before anything starts."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return None
    plan(mode, world, num_heads)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return init_parallel(mode, device=device, fsdp=fsdp, num_heads=num_heads)


# ---------------------------------------------------------------------------------------------
# Ulysses attention


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group, seq_len: int,
                      inner) -> torch.Tensor:
    """Self-attention over the whole sequence from sequence shards: (B, H, Ls, D) each -> (B, H, Ls, D).

    This rank holds Ls = padded L / n tokens for all H heads. One all-to-all gives it all n * Ls tokens for
    H/n heads; `inner` attends the first `seq_len` (the real tokens); the output, zero on padded rows,
    goes back to sequence shards with a second all-to-all.
    """
    n = dist.get_world_size(group)
    b, h, ls, d = q.shape
    send = q.new_empty(n, 3, b, h // n, ls, d)  # block j (heads j*H/n...) goes to rank j
    for i, x in enumerate((q, k, v)):
        send[:, i] = x.unflatten(1, (n, h // n)).transpose(0, 1)  # (n, B, H/n, Ls, D)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # block j: rank j's tokens of this rank's heads
    qkv = recv.permute(1, 2, 3, 0, 4, 5).reshape(3, b, h // n, n * ls, d)[..., :seq_len, :]  # (3, B, H/n, L, D)
    out = inner(*qkv.unbind(0))  # (B, H/n, L, D)
    out = F.pad(out, (0, 0, 0, n * ls - seq_len)).unflatten(2, (n, ls))  # (B, H/n, n, Ls, D)
    send = out.permute(2, 0, 1, 3, 4).contiguous()  # (n, B, H/n, Ls, D): block j goes to rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # block j: rank j's heads of this rank's tokens
    return recv.transpose(0, 1).reshape(b, h, ls, d)  # (B, H, Ls, D)


# ---------------------------------------------------------------------------------------------
# the expert over several ranks


class ParallelExpert(nn.Module):
    """One expert run over the grid; callable as `model(x, t, context)` like a WanModel, the full velocity
    on every rank. `.guided(...)` is CFG, with the two passes on the two halves of the grid. Under FSDP
    this module is the root (its forward is the entry point that gathers embeddings and head)."""

    def __init__(self, model: WanModel, ctx: ParallelContext):
        super().__init__()
        check_sp_size(ctx.sp_size, model.cfg.num_heads, ctx.cfg_size)
        self.model = model
        self.ctx = ctx

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (B, in, F, H, W), t (B,), context (B, L, text_dim) -> (B, out, F, H, W) float32, on every rank."""
        model, n, group = self.model, self.ctx.sp_size, self.ctx.mesh.get_group("sp")
        h, cond = model.embed(x, t, context)  # (B, L, C): the whole sequence, on every rank (cheap)
        if n > 1:
            seq_len = h.shape[1]
            shard = -(-seq_len // n)  # tokens per rank, the sequence padded to n * shard
            rows = slice(self.ctx.sp_rank * shard, (self.ctx.sp_rank + 1) * shard)
            pad = n * shard - seq_len
            h = F.pad(h, (0, 0, 0, pad))[:, rows]  # (B, Ls, C)
            rope = tuple(F.pad(tab, (0, 0, 0, 0, 0, pad))[rows] for tab in cond.rope)  # (Ls, 1, D/2) each
            attend = partial(ulysses_attention, group=group, seq_len=seq_len, inner=cond.self_attention)
            shard_cond = replace(cond, rope=rope, self_attention=attend)
        else:
            shard_cond = cond
        for block in model.blocks:
            h = block(h, shard_cond)
        if n > 1:
            full = h.new_empty(n * h.shape[0], *h.shape[1:])  # (n*B, Ls, C)
            dist.all_gather_into_tensor(full, h.contiguous(), group=group)
            h = full.unflatten(0, (n, -1)).transpose(0, 1).flatten(1, 2)[:, :seq_len]  # (B, L, C)
        return model.unembed(h, cond)

    def guided(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, context_null: torch.Tensor,
               scale: float) -> torch.Tensor:
        """Classifier-free guidance in float32, uncond + s * (cond - uncond), on every rank. CFG parallel:
        half 0 runs the cond pass, half 1 the uncond pass, one all-gather; otherwise two passes. Guidance
        1.0: the cond pass alone, on every rank."""
        if scale == 1.0:
            return self(x, t, context).float()
        if self.ctx.cfg_size == 1:
            cond, uncond = self(x, t, context).float(), self(x, t, context_null).float()
        else:
            mine = self(x, t, context if self.ctx.cfg_rank == 0 else context_null).float()
            both = mine.new_empty(2 * mine.shape[0], *mine.shape[1:])  # (2B, out, F, H, W): cond, uncond
            dist.all_gather_into_tensor(both, mine.contiguous(), group=self.ctx.mesh.get_group("cfg"))
            cond, uncond = both.chunk(2)
        return combine_guidance(cond, uncond, scale)


def parallelize(model: WanModel, ctx: ParallelContext) -> ParallelExpert:
    """Wrap one expert for the grid. With `ctx.fsdp_mesh`, FSDP2-shard it in place: each block, then the
    wrapper as root (embeddings, head; also resharded after each call, as the expert may sit idle for the
    other expert's steps); shards go to ctx.device. Otherwise move it there whole."""
    from torch.distributed.fsdp import fully_shard

    expert = ParallelExpert(model.requires_grad_(False).eval(), ctx)
    if ctx.fsdp_mesh is None:
        return expert.to(ctx.device) if not _on_meta(model) else expert
    for block in model.blocks:
        fully_shard(block, mesh=ctx.fsdp_mesh)
    fully_shard(expert, mesh=ctx.fsdp_mesh, reshard_after_forward=True)  # explicit: a root keeps them otherwise
    return expert


def wrap_experts(high: WanModel, low: WanModel, ctx: ParallelContext) -> tuple[ParallelExpert, ParallelExpert]:
    """Both experts wrapped for the grid (loaded already on every rank; see load_parallel_experts)."""
    return parallelize(high, ctx), parallelize(low, ctx)


# ---------------------------------------------------------------------------------------------
# loading straight into the shards


def load_parallel_expert(path, ctx: ParallelContext, *, dtype: torch.dtype = torch.bfloat16,
                         loras: Sequence[tuple[str, float]] = ()) -> ParallelExpert:
    """One expert folder (official or diffusers layout; a quantized one when replicated) loaded into a
    ParallelExpert, sharded or replicated as ctx says. Rank 0 reads each tensor memory-mapped, casts it
    to its runtime dtype on its device and scatters it (FSDP) or broadcasts it (replicated); other
    ranks read only shapes. Host RAM: one tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    path = Path(path)
    if expert_scheme(path) != "none":
        if ctx.fsdp_mesh is None:  # replicated: every rank loads the quantized expert itself
            return parallelize(load_expert(path, dtype=dtype, device=ctx.device, loras=loras), ctx)
        raise CheckpointError(f"{path} is a quantized expert: FSDP shards float weights only; run with "
                              "--no-fsdp (each GPU holds the whole 8-bit expert) or from the bf16 checkpoint")
    source = open_expert(path, loras=loras)
    with torch.device("meta"):
        model = WanModel(source.config)
    shapes = {name: p.shape for name, p in model.state_dict().items()}
    _check_shapes(source, shapes)
    model.load_state_dict({name: torch.empty(shape, dtype=WanModel.param_dtype(name, dtype), device="meta")
                           for name, shape in shapes.items()}, assign=True)
    expert = parallelize(model, ctx)
    expert.to_empty(device=ctx.device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            full = (source.tensor(name).to(ctx.device, param.dtype) if ctx.is_main
                    else torch.empty(param.shape, dtype=param.dtype, device=ctx.device))
            if isinstance(param, DTensor):  # FSDP: keep this rank's rows
                param.to_local().copy_(distribute_tensor(full, param.device_mesh, param.placements,
                                                         src_data_rank=0).to_local())
            else:
                dist.broadcast(full, src=0)
                param.copy_(full)
    return expert


def load_parallel_experts(root: ModelRoot, ctx: ParallelContext, *, dtype: torch.dtype = torch.bfloat16,
                          loras: dict[str, Sequence[tuple[str, float]]] | None = None
                          ) -> tuple[ParallelExpert, ParallelExpert]:
    """(high, low) of a model root, loaded for the grid, with each expert's LoRAs merged."""
    loras = loras or {}
    return (load_parallel_expert(root.high, ctx, dtype=dtype, loras=loras.get("high", ())),
            load_parallel_expert(root.low, ctx, dtype=dtype, loras=loras.get("low", ())))


def _check_shapes(source, shapes: dict[str, torch.Size]) -> None:
    """On every rank, from the metadata: the checkpoint has exactly the model's tensors, in its shapes
    (a mismatch found on rank 0 alone would leave the others waiting in a collective)."""
    stored = source.shapes()
    missing, unexpected = sorted(set(shapes) - set(stored)), sorted(set(stored) - set(shapes))
    if missing or unexpected:
        raise CheckpointError(f"{source.path} does not match a {source.config.num_layers}-layer Wan2.2 expert "
                              f"(missing {missing[:6]}, unexpected {unexpected[:6]}): re-download the folder, or "
                              "run load_expert() on it for the full report")
    for name, shape in shapes.items():
        if stored[name] != list(shape):
            raise CheckpointError(f"{source.path}: tensor {name!r} has shape {stored[name]}, the model needs "
                                  f"{list(shape)}: the shards mix different models, download them again")


def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())
