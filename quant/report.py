"""Quality report of a quantized model root against its source.

Two measurements, both on the same seeded noise and context:
- per layer: the relative error ||Q(x) - L(x)|| / ||L(x)|| of every quantized Linear against its
  source Linear, on the activations the *source* model produces during a short denoise (forward
  hooks on the source Linears run the quantized module on the same input), accumulated over every
  call (both CFG passes, every step);
- end to end: the relative drift ||x_q - x|| / ||x|| of the final latents of that denoise
  (`wan_lite.sample`, `steps` steps) run with the quantized experts instead of the source ones.

The kernel is whatever `select_kernel` picks on `device` (w8a16 on the CPU, w8a8 on a capable
GPU), so the numbers are those of the path that will run. Memory: the source and quantized experts
are loaded together (about 85 GB for A14B in bf16): use a large GPU, or the CPU with enough RAM.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from wan_lite.quantized.format import is_quantized_linear


@torch.no_grad()
def _layer_hooks(src_model, q_model, sums: dict[str, list[float]]):
    q_modules = dict(q_model.named_modules())

    def hook(name):
        def post(module, args, out):
            ref = out.float()
            diff = q_modules[name](args[0]).float() - ref
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0] += diff.pow(2).sum().item()
            acc[1] += ref.pow(2).sum().item()
        return post

    return [m.register_forward_hook(hook(n)) for n, m in src_model.named_modules() if is_quantized_linear(n)]


@torch.no_grad()
def quality_report(src_root, q_root, *, steps: int = 6, size=(832, 480), frames: int = 17, seed: int = 0,
                   device="cpu", dtype=torch.bfloat16, context: torch.Tensor | None = None,
                   context_null: torch.Tensor | None = None) -> dict:
    """Per-layer relative errors and final-latent drift (see the module docstring) as a JSON-able dict.

    `size` is (width, height) in pixels. An expert that runs no step of a `steps`-step denoise (the
    low-noise one below 3 steps) has no layer errors: its summary entry says so in a "note".
    """
    from wan_lite import SamplingConfig, sample
    from wan_lite.checkpoint import find_experts, load_expert
    from wan_lite.config import VideoSize
    from wan_lite.quantized.format import META_FILE, read_meta
    from wan_lite.quantized.kernels import select_kernel

    video = VideoSize.of(size, frames)  # checked before four experts load
    sampling = SamplingConfig(steps=steps)
    src = dict(zip(("high", "low"), find_experts(src_root)))
    qnt = dict(zip(("high", "low"), find_experts(q_root)))
    models = {k: load_expert(p, dtype=dtype, device=device) for k, p in src.items()}
    qmodels = {k: load_expert(p, dtype=dtype, device=device) for k, p in qnt.items()}
    cfg = models["high"].cfg
    g = torch.Generator().manual_seed(seed)
    if context is None:  # random embeddings: the report measures the weights, not a prompt
        context = torch.randn(1, 32, cfg.text_dim, generator=g)
    if context_null is None:
        context_null = torch.randn(1, 12, cfg.text_dim, generator=g)
    noise = torch.randn(1, *video.latent_shape(cfg.in_dim), generator=g)  # (1, C, F', H/8, W/8)
    args = (noise.to(device), context.to(device, dtype), context_null.to(device, dtype), sampling)

    sums = {"high": {}, "low": {}}
    handles = [hk for k in ("high", "low") for hk in _layer_hooks(models[k], qmodels[k], sums[k])]
    try:
        ref = sample(models["high"], models["low"], *args)
    finally:
        for hk in handles:
            hk.remove()
    out = sample(qmodels["high"], qmodels["low"], *args)

    layers = {k: {n: math.sqrt(e / max(r, 1e-30)) for n, (e, r) in s.items()} for k, s in sums.items()}
    schemes = {k: (read_meta(p)["scheme"] if (Path(p) / META_FILE).is_file() else "none") for k, p in qnt.items()}
    scheme = schemes["high"] if schemes["high"] != "none" else schemes["low"]
    return {
        "source": str(src_root), "quantized": str(q_root), "schemes": schemes,
        "kernel": select_kernel(torch.device(device), scheme) if scheme in ("int8", "fp8") else scheme,
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "steps": steps,
        "width": video.width, "height": video.height, "frames": video.frames,
        "latent_shape": list(noise.shape), "seed": seed,
        "latents": {"rel_error": ((out - ref).norm() / ref.norm()).item(),
                    "max_abs_error": (out - ref).abs().max().item()},
        "summary": summarize(layers, sampling),
        "layers": layers,
    }


def summarize(layers: dict[str, dict[str, float]], sampling) -> dict[str, dict]:
    """Per expert: the timesteps it ran and its layers' mean / max relative error and worst layer; for an
    expert that ran no step, a "note" saying it is not covered and how many steps would cover it."""
    from wan_lite.pipeline import timesteps

    summary = {}
    for k, errs in layers.items():
        ran = [t for t in timesteps(sampling) if (t >= sampling.boundary_timestep) == (k == "high")]
        entry = {"steps": len(ran), "timesteps": ran}
        if errs:
            worst = max(errs, key=errs.get)
            entry |= {"layers": len(errs), "mean": sum(errs.values()) / len(errs), "max": errs[worst],
                      "worst": worst}
        else:
            entry["note"] = (f"not covered: the {k}-noise expert runs no step of a {sampling.steps}-step denoise "
                             f"(it takes t {'>=' if k == 'high' else '<'} {sampling.boundary_timestep:g}); "
                             f"--steps {steps_covering_both(sampling)} runs both experts")
        summary[k] = entry
    return summary


def steps_covering_both(sampling) -> int:
    """The fewest steps (this shift and boundary) in which each expert runs at least one."""
    import dataclasses

    from wan_lite.pipeline import high_steps

    for n in range(2, 1001):
        if 0 < high_steps(dataclasses.replace(sampling, steps=n)) < n:
            return n
    raise ValueError(f"no step count up to 1000 runs both experts with shift {sampling.shift} "
                     f"and boundary {sampling.boundary}")


def format_report(r: dict, top: int = 10) -> str:
    """A printable table: summary per expert, the `top` worst layers, the latent drift."""
    lines = [f"quality of {r['quantized']} ({r['schemes']}, kernel {r['kernel']}, {r['device']} {r['dtype']}) "
             f"against {r['source']}", ""]
    lines.append(f"{'expert':<7} {'steps':>5} {'layers':>6} {'mean rel err':>13} {'max rel err':>12}  worst layer")
    for k, s in r["summary"].items():
        if "note" in s:
            lines.append(f"{k:<7} {s['steps']:>5} {s['note']}")
        else:
            lines.append(f"{k:<7} {s['steps']:>5} {s['layers']:>6} {s['mean']:>13.4e} {s['max']:>12.4e}  "
                         f"{s['worst']}")
    ranked = sorted(((e, k, n) for k, errs in r["layers"].items() for n, e in errs.items()), reverse=True)[:top]
    lines += ["", f"{'worst layers':<40} {'rel err':>10}"]
    lines += [f"{k + ':' + n:<40} {e:>10.4e}" for e, k, n in ranked]
    lat = r["latents"]
    lines += ["", f"final latents after {r['steps']} steps ({r['width']}x{r['height']}, {r['frames']} frames, "
              f"latents {tuple(r['latent_shape'])}): rel error "
              f"{lat['rel_error']:.4e}, max abs error {lat['max_abs_error']:.4e}"]
    return "\n".join(lines)


def write_json(r: dict, path) -> None:
    Path(path).write_text(json.dumps(r, indent=1) + "\n")
