"""The Blocks layout: components, and which `App` method each event calls (app/handlers.py does the work).

Concurrency: the app keeps its own line for the GPU (`App.line`, one video at a time, first come first
served), so every Generate click enters `App.generate` at once (`concurrency_limit=None`) and its status
line shows its place in the queue; Cancel then always reaches the run (out of the queue, after the
current step, or before the next decoded frame) and the run's own result reaches the browser. While a
window's run is queued or running its Generate button is disabled and says why.

Errors: `App` raises gr.Error; here they become a notice (gr.Warning) and the status line, never an
exception out of an event, so no component is left with a red "Error" badge and the terminal shows no
traceback. The run itself is a plain function with a gr.Progress bar; the status line and the live
preview beside it come from a 0.5 s timer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gradio as gr

from wan_lite.config import SOLVERS

from .handlers import MAX_FRAMES, MAX_LORA_STRENGTH, SETTING_NAMES, VRAM_PROFILES, App, Settings, Update
from .options import PRESETS, STEP_CACHES

CSS = "#status textarea {font-family: ui-monospace, monospace} #plan textarea {font-family: ui-monospace, monospace}"
BUSY = "Generating: one video per window at a time (Cancel stops it)"
PRESET_FIELDS = ("steps", "shift", "guidance_high", "guidance_low", "solver")  # what picking a preset fills
PLAN_INPUTS = ("size", "frames", "preset", "steps", "guidance_high", "guidance_low", "shift", "solver", "lora_high",
               "lora_high_strength", "lora_low", "lora_low_strength", "quantization", "exact_attention", "step_cache",
               "vram_profile")


def build_ui(app: App) -> gr.Blocks:
    s = app.settings()
    with gr.Blocks(title="wan-lite: Wan2.2 text to video", analytics_enabled=False) as blocks:
        gr.Markdown("## wan-lite · Wan2.2-T2V-A14B text to video")
        banner = gr.Markdown(app.banner(), elem_id="banner")
        with gr.Row():
            with gr.Column(scale=5):
                c = _controls(app, s)
                plan = gr.Textbox(app.plan(s), label="What the run will do", lines=6, max_lines=16,
                                  interactive=False, elem_id="plan")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
            with gr.Column(scale=4):
                status = gr.Textbox(label="Status", interactive=False, elem_id="status", lines=2)
                timer = gr.Timer(0.5)  # the status line and preview of this browser's run, while it runs
                preview = gr.Image(label="Live preview (latents as RGB, every step)", interactive=False,
                                   type="numpy", height=140, elem_id="preview", show_label=True)
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
                                    label="Model folder (Wan2.2-T2V-A14B root: official or diffusers layout, or a "
                                    "quantized copy)", scale=5, elem_id="model")
                load = gr.Button("Load", scale=1, elem_id="load")

        controls = [c[name] for name in SETTING_NAMES]
        result = [status, video, params, c["seed"]]

        def settings_of(data: dict) -> Settings:  # gradio passes a {component: value} dict for a set of inputs
            return Settings(**{name: data[c[name]] for name in SETTING_NAMES})

        def busy():
            return gr.Button(BUSY, interactive=False)

        def run(data: dict, request: gr.Request, progress=gr.Progress()):  # noqa: B008 (gradio's documented form)
            try:
                return _outputs(app.generate(settings_of(data), session=request.session_hash, progress=progress))
            except gr.Error as e:
                line = app.status(request.session_hash) or e.message
                gr.Warning(e.message, title=line.split(":")[0])
                return line, gr.skip(), gr.skip(), gr.skip()

        def after_run():
            return gr.Button("Generate", interactive=True), *listing()

        def poll(request: gr.Request):
            line, picture = app.status(request.session_hash), app.preview(request.session_hash)
            return (gr.skip() if line is None else line), (gr.skip() if picture is None else picture)

        def stop(request: gr.Request):
            return app.cancel(request.session_hash)

        def show_plan(data: dict):
            return app.plan(settings_of(data))

        def fill_preset(data: dict):  # the sampler's fields and the plan that shows them, in one update
            s = settings_of(data)
            fills = PRESETS[s.preset].fills()
            return [*(fills[n] for n in PRESET_FIELDS), app.plan(dataclasses.replace(s, **fills))]

        def listing():
            items = app.gallery()
            return items, [Path(path).name for path, _ in items]

        def open_item(names, evt: gr.SelectData):
            try:
                if not 0 <= evt.index < len(names):
                    raise gr.Error("That video is no longer listed: press Refresh.")
                path, info = app.open_output(names[evt.index])
            except gr.Error as e:
                gr.Warning(e.message, title="Not opened")
                return gr.skip(), gr.skip(), f"Not opened: {e.message}"
            return path, info, f"Showing {Path(path).name}"

        def load_model(root):
            try:
                banner_text = app.load_model(root)
            except gr.Error as e:  # the typed path stays in the field; the loaded model stays
                gr.Warning(e.message, title="Model not loaded")
                return (gr.skip(),) * 7 + (f"Model not loaded: {e.message}",)
            s = app.settings()
            return (banner_text, gr.Dropdown(choices=app.model_roots(), value=str(app.pipe.root)),
                    gr.Dropdown(choices=list(app.size_presets()), value=s.size), s.frames, s.steps,
                    gr.Dropdown(choices=app.quant_choices(), value=s.quantization), app.plan(s),
                    f"Loaded {app.pipe.root}.")

        def initial():
            s = app.settings()
            ready = f"Ready: {'demo model' if app.is_demo else app.pipe.root.name} on {app.device.type}."
            values = {n: getattr(s, n) for n in SETTING_NAMES}
            values["quantization"] = gr.Dropdown(choices=app.quant_choices(), value=s.quantization)
            for name in ("lora_high", "lora_low"):  # files copied into the LoRA folder since the start
                values[name] = gr.Dropdown(choices=app.loras.names(), value=getattr(s, name))
            return [*(values[n] for n in SETTING_NAMES), app.plan(s), *listing(), ready]

        start = generate.click(busy, None, generate, concurrency_limit=None, show_progress="hidden")
        gen = start.then(run, set(controls), result, concurrency_limit=None, show_progress_on=[video])
        gen.then(after_run, None, [generate, gallery, shown], concurrency_limit=None, show_progress="hidden")
        cancel.click(stop, None, status, concurrency_limit=None, show_progress="hidden")
        timer.tick(poll, None, [status, preview], concurrency_limit=None, show_progress="hidden")
        c["preset"].input(fill_preset, set(controls), [*(c[n] for n in PRESET_FIELDS), plan], concurrency_limit=None)
        # .input (a person's edit), not .change: a preset's or a model load's own update of these fields
        # already carries its plan, and a .change per filled field would race it with half-updated data
        gr.on([c[n].input for n in PLAN_INPUTS if n != "preset"], show_plan, set(controls), plan,
              concurrency_limit=None, show_progress="hidden")
        refresh.click(listing, None, [gallery, shown], concurrency_limit=None)
        gallery.select(open_item, shown, [video, params, status], concurrency_limit=None)
        load.click(load_model, model, [banner, model, c["size"], c["frames"], c["steps"], c["quantization"], plan,
                                       status], concurrency_limit=None, show_progress="hidden")
        blocks.load(initial, None, [*controls, plan, gallery, shown, status], concurrency_limit=None)
    return blocks


def _controls(app: App, s: Settings) -> dict:
    """The settings' components, keyed by Settings field."""
    c = {}
    c["prompt"] = gr.Textbox(label="Prompt", lines=3, value=s.prompt, elem_id="prompt",
                             placeholder="Describe the video: subject, action, scene, camera, light")
    c["negative_prompt"] = gr.Textbox(label="Negative prompt (official default)", lines=2, value=s.negative_prompt)
    with gr.Row():
        c["size"] = gr.Dropdown(list(app.size_presets()), value=s.size, label="Size (width x height)")
        c["frames"] = gr.Slider(1, MAX_FRAMES, value=s.frames, step=4, label="Frames (4n+1, 16 fps)",
                                elem_id="frames")
        c["steps"] = gr.Slider(1, 100, value=s.steps, step=1, label="Steps", elem_id="steps")
    with gr.Row():
        c["preset"] = gr.Radio([(p.label, key) for key, p in PRESETS.items()], value=s.preset,
                               label="Preset (fills steps, shift, guidance and solver)", elem_id="preset")
        c["random_seed"] = gr.Checkbox(value=s.random_seed, label="Random seed")
        c["seed"] = gr.Number(value=s.seed, precision=0, minimum=0, label="Seed (the one used is shown here after a "
                              "run)", elem_id="seed")
    with gr.Accordion("Sampler", open=False):
        with gr.Row():
            c["guidance_high"] = gr.Number(value=s.guidance_high, label="Guidance, high-noise expert",
                                           elem_id="guidance_high")
            c["guidance_low"] = gr.Number(value=s.guidance_low, label="Guidance, low-noise expert")
            c["shift"] = gr.Number(value=s.shift, label="Shift", elem_id="shift")
            c["solver"] = gr.Radio(list(SOLVERS), value=s.solver, label="Solver", elem_id="solver")
            c["step_cache"] = gr.Dropdown(list(STEP_CACHES), value=s.step_cache, elem_id="step_cache",
                                          label="Step cache (skips steps whose output changes little; quality not "
                                          "measured: compare with off)")
    folder = app.loras.folder
    with gr.Accordion(f"LoRAs ({folder})" if folder else "LoRAs (start the app with --loras DIR)", open=bool(folder)):
        with gr.Row():
            for name, expert in (("high", "high-noise"), ("low", "low-noise")):
                with gr.Column():
                    c[f"lora_{name}"] = gr.Dropdown(app.loras.names(), value=getattr(s, f"lora_{name}"),
                                                    multiselect=True, label=f"LoRAs on the {expert} expert",
                                                    elem_id=f"lora_{name}")
                    c[f"lora_{name}_strength"] = gr.Slider(-MAX_LORA_STRENGTH, MAX_LORA_STRENGTH, step=0.05,
                                                           value=getattr(s, f"lora_{name}_strength"),
                                                           label=f"Strength, {expert} expert")
    with gr.Row():
        c["quantization"] = gr.Dropdown(app.quant_choices(), value=s.quantization, elem_id="quantization",
                                        label="Quantization (what this model's files hold; auto: as stored)")
        c["vram_profile"] = gr.Dropdown(list(VRAM_PROFILES), value=s.vram_profile, label="VRAM profile")
        c["exact_attention"] = gr.Checkbox(value=s.exact_attention, label="Exact attention (FP8 attention off)",
                                           elem_id="exact_attention")
    return c


def _outputs(u: Update) -> tuple:
    """An Update as the values of (status, video, params, seed); what it does not carry stays as it is."""
    return (u.status, *(gr.skip() if v is None else v for v in (u.video, u.params, u.seed)))
