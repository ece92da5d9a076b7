"""python -m app: the Gradio app on http://127.0.0.1:PORT (a public link only with --share).

    python -m app                                   # the built-in tiny demo model (random weights)
    python -m app --ckpt /path/to/Wan2.2-T2V-A14B   # real weights: official, diffusers or quantized root
    python -m app --ckpt ROOT --loras ~/loras       # offer the LoRA files of a folder per expert
    python -m app --high H.safetensors --low L.safetensors --text-encoder umt5_xxl_fp16.safetensors \
                  --vae wan_2.1_vae.safetensors [--tokenizer DIR]   # single files (fp16/bf16, fp8 scaled, GGUF)
    python -m app --ckpt ComfyUI/models --high NAME --low NAME     # a ComfyUI models/ folder, experts by name

The model flags are the CLI's (`python -m wan_lite.generate`), mapped by `app.models.open_files`.
"""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app", description="wan-lite: Wan2.2-T2V-A14B text to video in the "
                                "browser. Without --ckpt a tiny random demo model shows the whole flow.")
    p.add_argument("--ckpt", default=None, help="model root: a Wan2.2-T2V-A14B folder in the official or diffusers "
                   "layout, or a quantized copy made by python -m wan_lite.quantize (default: the built-in demo "
                   "model); or, with --high/--low naming the expert files there, a ComfyUI models/ folder")
    p.add_argument("--high", default=None, help="the high-noise expert: one .safetensors (fp16/bf16/fp32, fp8 scaled) "
                   "or .gguf file, or its file name in the ComfyUI --ckpt folder's diffusion_models/")
    p.add_argument("--low", default=None, help="the low-noise expert (same kinds as --high)")
    p.add_argument("--text-encoder", default=None, help="with --high/--low: the umt5-xxl encoder file "
                   "(umt5_xxl_fp16.safetensors, fp8 scaled too) (default with a ComfyUI --ckpt: found in "
                   "text_encoders/)")
    p.add_argument("--vae", default=None, help="with --high/--low: the Wan2.1 VAE file (wan_2.1_vae.safetensors) "
                   "or a diffusers vae/ folder (default with a ComfyUI --ckpt: found in vae/)")
    p.add_argument("--tokenizer", default=None, help="the google/umt5-xxl tokenizer folder for a single-file text "
                   "encoder (default: the hub id, cached or downloaded)")
    p.add_argument("--loras", default=None, metavar="DIR", help="folder of LoRA .safetensors files offered per expert "
                   "with a strength each (e.g. the Wan2.2-Lightning HIGH/LOW pair for the Lightning preset)")
    p.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1 (7860)")
    p.add_argument("--outputs", default="outputs", help="folder for videos, their .json sidecars and settings.json "
                   "(./outputs); the only folder the browser can read files from")
    p.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default; then "
                   "only the listed model folders can be loaded)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--cache-dir", default=None, help="demo model and prompt-embedding cache (~/.cache/wan-lite)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from .handlers import App
    from .models import ModelFiles
    from .ui import CSS, build_ui

    files = None
    if args.high is not None or args.low is not None:  # the pieces, as the CLI takes them
        files = ModelFiles.of(high=args.high, low=args.low, text_encoder=args.text_encoder, vae=args.vae,
                              tokenizer=args.tokenizer, comfyui=args.ckpt)
    elif args.text_encoder is not None or args.vae is not None:
        print("error: --text-encoder and --vae go with --high and --low (the two expert files)", file=sys.stderr)
        return 2
    try:
        app = App(args.outputs, ckpt=None if files else args.ckpt, device=args.device, cache_dir=args.cache_dir,
                  share=args.share, loras=args.loras, files=files)
    except gr.Error as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    what = "demo model" if app.is_demo else app.pipe.model_name
    print(f"wan-lite app: {what} on {app.device}; outputs in {app.outputs}")
    print(f"Open http://127.0.0.1:{args.port} (this computer only" +
          ("; a public link follows)" if args.share else "; python -m app --share adds a public link)"), flush=True)
    blocks = build_ui(app)
    blocks.queue(default_concurrency_limit=1).launch(  # quiet: gradio's own lines name launch() arguments
        server_name="127.0.0.1", server_port=args.port, share=args.share, allowed_paths=[str(app.outputs)],
        show_error=True, ssr_mode=False, css=CSS, footer_links=[], quiet=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
