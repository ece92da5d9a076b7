"""Activation statistics for SmoothQuant: per-input-channel absmax of every quantized block Linear.

    python -m calib.collect --ckpt ROOT --out calib_stats.safetensors [--prompts calib/prompts.txt]
        [--size 832x480] [--frames 17] [--steps 8] [--max-prompts N] [--device cuda] [--random-context]

For each prompt, a short denoise (`wan_lite.sample`, both experts, CFG with the negative prompt)
runs from seeded noise while forward pre-hooks on the block Linears record max |x_j| over every
token of every call, per expert. The prompts are encoded with the model's text encoder
(`wan_lite.text.TextEncoder`, loaded lazily, cached on disk). Without text-encoder weights (tests,
or `--random-context`) the contexts are random embeddings: enough to exercise the tool, not to
calibrate a real model.

Memory: the two experts are loaded in bf16 on `--device` (57 GB for A14B: a large GPU, or the CPU
with patience); statistics are tiny (one vector per Linear). Small latents (the default 832x480x17
is 7,800 tokens) are enough: the statistics are per channel, not per position.

The output is a safetensors file with keys `high/<linear>` and `low/<linear>` (float32 (K,)) and
the settings in its header metadata; `python -m wan_lite.quantize --calib FILE` reads it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch

from wan_lite.config import VideoSize, size_arg

FORMAT = "wan-lite-calib"
DEFAULT_PROMPTS = Path(__file__).resolve().parent / "prompts.txt"


def read_prompts(path=DEFAULT_PROMPTS) -> list[str]:
    """Non-empty lines that are not '#' comments."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


@contextlib.contextmanager
def record_absmax(model: torch.nn.Module, stats: dict[str, torch.Tensor]):
    """While active, stats[name] = running max over tokens of |x| (K,) for each quantized block Linear."""
    from wan_lite.quantized.format import is_quantized_linear

    def hook(name):
        def pre(module, args):
            x = args[0].detach()
            amax = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()  # (K,)
            stats[name] = amax if name not in stats else torch.maximum(stats[name], amax)
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if is_quantized_linear(n)]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def random_contexts(n: int, text_dim: int, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """n random prompt embeddings (L_i, text_dim) of varied lengths, and a null context: a stand-in for tests."""
    g = torch.Generator().manual_seed(seed)
    contexts = [torch.randn(8 + (7 * i) % 57, text_dim, generator=g) for i in range(n)]
    return contexts, torch.randn(12, text_dim, generator=g)


def encode_prompts(root, prompts: list[str], device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The prompts and the official negative prompt through the model's umt5 encoder (lazily imported)."""
    from wan_lite.text import DEFAULT_NEGATIVE_PROMPT, TextEncoder

    encoder = TextEncoder.from_pretrained(root, device=device)
    contexts = encoder.encode(prompts)
    null = encoder.encode([DEFAULT_NEGATIVE_PROMPT])[0]
    encoder.unload()
    return contexts, null


@torch.no_grad()
def collect(high, low, contexts: list[torch.Tensor], context_null: torch.Tensor, *, latent_shape, steps: int = 8,
            seed: int = 0, progress: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Run a `steps`-step denoise per context and return {"high": {linear: absmax}, "low": {...}} on the CPU.

    `latent_shape` is (16, F', H/8, W/8); each prompt gets its own seeded noise.
    """
    from tqdm import tqdm

    from wan_lite import SamplingConfig, sample

    device = next(high.parameters()).device
    sampling = SamplingConfig(steps=steps)
    stats = {"high": {}, "low": {}}
    with record_absmax(high, stats["high"]), record_absmax(low, stats["low"]):
        for i, ctx in enumerate(tqdm(contexts, desc="calibration", unit="prompt", disable=not progress)):
            g = torch.Generator().manual_seed(seed + i)
            noise = torch.randn(1, *latent_shape, generator=g).to(device)
            sample(high, low, noise, ctx[None].to(device), context_null[None].to(device), sampling)
    for expert, s in stats.items():
        if not s:
            raise ValueError(f"the {expert}-noise expert never ran in a {steps}-step denoise, so it has no "
                             "statistics: calibrate with more steps (--steps 8 runs both)")
    return {k: {n: v.cpu() for n, v in s.items()} for k, s in stats.items()}


def save_stats(stats: dict[str, dict[str, torch.Tensor]], path, settings: dict) -> Path:
    from safetensors.torch import save_file

    tensors = {f"{expert}/{name}": v.contiguous() for expert, s in stats.items() for name, v in s.items()}
    save_file(tensors, path, metadata={"format": FORMAT, "settings": json.dumps(settings)})
    return Path(path)


def load_stats(path) -> dict[str, dict[str, torch.Tensor]]:
    """{"high": {linear: absmax}, "low": {...}} from a file written by save_stats."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        if (f.metadata() or {}).get("format") != FORMAT:
            raise ValueError(f"{path} is not a wan-lite calibration file (no format={FORMAT} in its header): "
                             "make one with python -m calib.collect")
        stats = {"high": {}, "low": {}}
        for key in f.keys():
            expert, _, name = key.partition("/")
            stats[expert][name] = f.get_tensor(key)
    return stats


def run(root, *, prompts_file=DEFAULT_PROMPTS, size=(832, 480), frames=17, steps=8, max_prompts=None,
        device="cpu", dtype=torch.bfloat16, random_context=False, seed=0, progress=True):
    """Load both experts of `root`, encode the prompts, collect: the whole tool as a function.

    `size` is (width, height) in pixels; it, `frames` and `steps` are checked before an expert loads.
    """
    from wan_lite import SamplingConfig
    from wan_lite.checkpoint import find_experts, load_expert
    from wan_lite.pipeline import high_steps

    try:  # check the settings before two experts are loaded
        video = VideoSize.of(size, frames)
    except ValueError as e:
        raise ValueError(f"calibration size {size[0]}x{size[1]}x{frames} (width and height must be multiples "
                         f"of 16, frames 4n+1): {e}") from None
    if not 0 < high_steps(SamplingConfig(steps=steps)) < steps:
        raise ValueError(f"a {steps}-step denoise does not run both experts, so one would get no statistics: "
                         "calibrate with more steps (--steps 8 runs both)")
    prompts = read_prompts(prompts_file)[:max_prompts]
    high_path, low_path = find_experts(root)
    high = load_expert(high_path, dtype=dtype, device=device)
    low = load_expert(low_path, dtype=dtype, device=device)
    cfg = high.cfg
    if random_context:
        contexts, null = random_contexts(len(prompts), cfg.text_dim, seed)
    else:
        contexts, null = encode_prompts(root, prompts, device)
    stats = collect(high, low, [c.to(dtype) for c in contexts], null.to(dtype),
                    latent_shape=video.latent_shape(cfg.in_dim), steps=steps, seed=seed, progress=progress)
    settings = {"prompts": len(prompts), "width": video.width, "height": video.height, "frames": frames,
                "steps": steps, "seed": seed,
                "random_context": random_context, "root": str(root)}
    return stats, settings


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m calib.collect", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="model root (official or diffusers layout)")
    p.add_argument("--out", required=True, help="statistics file to write (.safetensors)")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    p.add_argument("--size", type=size_arg, default=(832, 480),
                   help="WIDTHxHEIGHT of the calibration video, multiples of 16 (832x480)")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--max-prompts", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--random-context", action="store_true",
                   help="random embeddings instead of the text encoder (tests; not a real calibration)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    stats, settings = run(a.ckpt, prompts_file=a.prompts, size=a.size, frames=a.frames, steps=a.steps,
                          max_prompts=a.max_prompts, device=a.device, random_context=a.random_context, seed=a.seed)
    save_stats(stats, a.out, settings)
    print(f"wrote {a.out}: {sum(len(s) for s in stats.values())} Linears, {settings['prompts']} prompts")


if __name__ == "__main__":
    main()
