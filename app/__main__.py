"""python -m app: the Gradio app on http://127.0.0.1:PORT (a public link only with --share).

    python -m app                                   # the built-in tiny demo model (random weights)
    python -m app --ckpt /path/to/Wan2.2-T2V-A14B   # real weights: official, diffusers or quantized root
    python -m app --ckpt ROOT --loras ~/loras       # offer the LoRA files of a folder per expert
"""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app", description="wan-lite: Wan2.2-T2V-A14B text to video in the "
                                "browser. Without --ckpt a tiny random demo model shows the whole flow.")
    p.add_argument("--ckpt", default=None, help="model root: a Wan2.2-T2V-A14B folder in the official or diffusers "
                   "layout, or a quantized copy made by python -m wan_lite.quantize (default: the built-in demo model)")
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
    from .ui import CSS, build_ui

    try:
        app = App(args.outputs, ckpt=args.ckpt, device=args.device, cache_dir=args.cache_dir, share=args.share,
                  loras=args.loras)
    except gr.Error as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    print(f"wan-lite app: {'demo model' if app.is_demo else app.pipe.root} on {app.device}; outputs in {app.outputs}")
    print(f"Open http://127.0.0.1:{args.port} (this computer only" +
          ("; a public link follows)" if args.share else "; python -m app --share adds a public link)"), flush=True)
    blocks = build_ui(app)
    blocks.queue(default_concurrency_limit=1).launch(  # quiet: gradio's own lines name launch() arguments
        server_name="127.0.0.1", server_port=args.port, share=args.share, allowed_paths=[str(app.outputs)],
        show_error=True, ssr_mode=False, css=CSS, footer_links=[], quiet=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
