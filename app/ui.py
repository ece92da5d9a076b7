"""The Blocks layout: components, and which `App` method each event calls (app/handlers.py does the work).

Concurrency: generation is the only GPU event; it runs one at a time (`concurrency_limit=1`, and the
queue's default is 1 too), the rest wait in gradio's queue, which shows each browser its position.
Cancel, the status timer, the memory plan, the gallery and model loading run beside it
(`concurrency_limit=None`). The run itself is a plain function with a gr.Progress bar (a generator's
bar disappears at its first yield); the status line beside it comes from a 0.5 s timer.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from wan_lite.config import SOLVERS

from .handlers import QUANT_CHOICES, SETTING_NAMES, VRAM_PROFILES, App, Settings, Update

CSS = "#status textarea {font-family: ui-monospace, monospace} #plan textarea {font-family: ui-monospace, monospace}"


def build_ui(app: App) -> gr.Blocks:
    s = app.settings()
    with gr.Blocks(title="wan-lite: Wan2.2 text to video", analytics_enabled=False) as blocks:
        gr.Markdown("## wan-lite · Wan2.2-T2V-A14B text to video")
        banner = gr.Markdown(app.banner(), elem_id="banner")
        with gr.Row():
            with gr.Column(scale=5):
                c = {}  # Settings field -> component
                c["prompt"] = gr.Textbox(label="Prompt", lines=3, value=s.prompt, elem_id="prompt",
                                         placeholder="Describe the video: subject, action, scene, camera, light")
                c["negative_prompt"] = gr.Textbox(label="Negative prompt (official default)", lines=2,
                                                  value=s.negative_prompt)
                with gr.Row():
                    c["size"] = gr.Dropdown(list(app.size_presets()), value=s.size, label="Size (width x height)")
                    c["frames"] = gr.Slider(1, 161, value=s.frames, step=4, label="Frames (4n+1, 16 fps)",
                                            elem_id="frames")
                    c["steps"] = gr.Slider(1, 100, value=s.steps, step=1, label="Steps", elem_id="steps")
                with gr.Row():
                    c["random_seed"] = gr.Checkbox(value=s.random_seed, label="Random seed")
                    c["seed"] = gr.Number(value=s.seed, precision=0, minimum=0, label="Seed (the one used is shown "
                                          "here after a run)", elem_id="seed")
                with gr.Accordion("Sampler", open=False):
                    with gr.Row():
                        c["guidance_high"] = gr.Number(value=s.guidance_high, label="Guidance, high-noise expert")
                        c["guidance_low"] = gr.Number(value=s.guidance_low, label="Guidance, low-noise expert")
                        c["shift"] = gr.Number(value=s.shift, label="Shift")
                        c["solver"] = gr.Radio(list(SOLVERS), value=s.solver, label="Solver")
                with gr.Row():
                    c["quantization"] = gr.Dropdown(list(QUANT_CHOICES), value=s.quantization,
                                                    label="Quantization (auto: as stored)")
                    c["vram_profile"] = gr.Dropdown(list(VRAM_PROFILES), value=s.vram_profile, label="VRAM profile")
                plan = gr.Textbox(app.plan(s), label="Memory plan", lines=4, max_lines=12, interactive=False,
                                  elem_id="plan")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
            with gr.Column(scale=4):
                status = gr.Textbox(label="Status", interactive=False, elem_id="status", lines=2)
                timer = gr.Timer(0.5)  # the status line of this browser's run, while it runs
                video = gr.Video(label="Video", interactive=False, elem_id="video")
                params = gr.JSON(label="Parameters used", elem_id="params")
        with gr.Accordion("Earlier outputs", open=True):
            gallery = gr.Gallery(label=f"{app.outputs} (click one to show it above)", columns=6, height=240,
                                 fit_columns=False, object_fit="cover", allow_preview=False, interactive=False,
                                 elem_id="gallery")
            refresh = gr.Button("Refresh", size="sm")
            shown = gr.State([])  # file names in the order the gallery shows them
        with gr.Accordion("Model", open=app.is_demo):
            with gr.Row():
                model = gr.Dropdown(app.model_roots(), value=str(app.pipe.root), allow_custom_value=not app.share,
                                    label="Model folder (Wan2.2-T2V-A14B root, official or diffusers layout)",
                                    scale=5, elem_id="model")
                load = gr.Button("Load", scale=1, elem_id="load")

        controls = [c[name] for name in SETTING_NAMES]
        result = [status, video, params, c["seed"]]

        def settings_of(data: dict) -> Settings:  # gradio passes a {component: value} dict for a set of inputs
            return Settings(**{name: data[c[name]] for name in SETTING_NAMES})

        def run(data: dict, request: gr.Request, progress=gr.Progress()):  # noqa: B008 (gradio's documented form)
            return _outputs(app.generate(settings_of(data), session=request.session_hash, progress=progress))

        def poll(request: gr.Request):
            line = app.status(request.session_hash)
            return gr.skip() if line is None else line

        def stop(request: gr.Request):
            return app.cancel(request.session_hash)

        def show_plan(data: dict):
            return app.plan(settings_of(data))

        def listing():
            items = app.gallery()
            return items, [Path(path).name for path, _ in items]

        def open_item(names, evt: gr.SelectData):
            if not 0 <= evt.index < len(names):
                raise gr.Error("That video is no longer listed: press Refresh.")
            path, info = app.open_output(names[evt.index])
            return path, info, f"Showing {Path(path).name}"

        def load_model(root):
            banner_text = app.load_model(root)
            s = app.settings()
            sizes = list(app.size_presets())
            return (banner_text, gr.Dropdown(choices=app.model_roots(), value=str(app.pipe.root)),
                    gr.Dropdown(choices=sizes, value=s.size), s.frames, s.steps, app.plan(s))

        def initial():
            s = app.settings()
            ready = f"Ready: {'demo model' if app.is_demo else app.pipe.root.name} on {app.device.type}."
            return [*(getattr(s, n) for n in SETTING_NAMES), app.plan(s), *listing(), ready]

        gen = generate.click(run, set(controls), result, concurrency_limit=1, concurrency_id="gpu",
                             show_progress_on=[video])
        gen.then(listing, None, [gallery, shown], concurrency_limit=None)
        cancel.click(stop, None, status, cancels=[gen], concurrency_limit=None)
        timer.tick(poll, None, status, concurrency_limit=None, show_progress="hidden")
        gr.on([c[n].change for n in ("size", "frames", "quantization", "vram_profile")], show_plan, set(controls), plan,
              concurrency_limit=None, show_progress="hidden")
        refresh.click(listing, None, [gallery, shown], concurrency_limit=None)
        gallery.select(open_item, shown, [video, params, status], concurrency_limit=None)
        load.click(load_model, model, [banner, model, c["size"], c["frames"], c["steps"], plan],
                   concurrency_limit=None, show_progress_on=[model])
        blocks.load(initial, None, [*controls, plan, gallery, shown, status], concurrency_limit=None)
    return blocks


def _outputs(u: Update) -> tuple:
    """An Update as the values of (status, video, params, seed); what it does not carry stays as it is."""
    return (u.status, *(gr.skip() if v is None else v for v in (u.video, u.params, u.seed)))

