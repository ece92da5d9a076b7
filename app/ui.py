"""The Blocks layout: components, and which `App` method each event calls (app/handlers.py does the work).

Concurrency: the app keeps its own line for the GPU (`App.line`, one video at a time, first come first
served), so every Generate click enters `App.generate` at once (`concurrency_limit=None`) and its status
line shows its place in the queue; Cancel then always reaches the run (out of the queue, after the
current step, or before the next decoded frame) and the run's own result reaches the browser. While a
window's run is queued or running its Generate button is disabled and says why.

Errors: `App` raises gr.Error; here they become a notice (gr.Warning) and the status line, never an
exception out of an event, so no component is left with a red "Error" badge and the terminal shows no
traceback. The run itself is a plain function with a gr.Progress bar; the status line and the live
previews beside it (latents as RGB every step; the full-VAE one every N steps when asked for) come from
a 0.5 s timer.

The Model accordion opens a model three ways, as the CLI does: a model root folder, two expert files
with the text encoder and VAE files, or a ComfyUI models/ folder whose diffusion_models/ fill the two
expert dropdowns once the folder is typed (Enter or leaving the field). Paths are typed, not uploaded:
the files are many GB and already on this computer. A failed load keeps every typed path and the model
that was loaded; its message (wan_lite's, naming the wrong file) goes to the status line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gradio as gr

from wan_lite.config import SOLVERS

from .handlers import (
    MAX_FRAMES,
    MAX_LORA_STRENGTH,
    MAX_VAE_PREVIEW_EVERY,
    SETTING_NAMES,
    VRAM_PROFILES,
    App,
    Settings,
    Update,
)
from .models import ModelFiles
from .options import PRESETS, STEP_CACHES

CSS = "#status textarea {font-family: ui-monospace, monospace} #plan textarea {font-family: ui-monospace, monospace}"
BUSY = "Generating: one video per window at a time (Cancel stops it)"
FILE_FIELDS = {  # ModelFiles field -> the Expert files tab's label
    "high": "High-noise expert file (.safetensors fp16/bf16/fp32 or fp8 scaled, or .gguf)",
    "low": "Low-noise expert file (the same kind as the high-noise one)",
    "text_encoder": "Text encoder file (umt5_xxl_fp16.safetensors, or fp8 scaled)",
    "vae": "VAE file (wan_2.1_vae.safetensors)",
    "tokenizer": "Tokenizer folder (google/umt5-xxl; empty: the hub id, downloaded once)",
}
PRESET_FIELDS = ("steps", "shift", "guidance_high", "guidance_low", "solver")  # what picking a preset fills
PLAN_INPUTS = ("size", "frames", "preset", "steps", "guidance_high", "guidance_low", "shift", "solver", "lora_high",
               "lora_high_strength", "lora_low", "lora_low_strength", "quantization", "exact_attention", "step_cache",
               "vram_profile", "vae_preview_every")


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
                vae_image = gr.Image(label="Full VAE preview (every N steps when turned on below the prompt)",
                                     interactive=False, type="numpy", height=160, elem_id="vae_preview")
                video = gr.Video(label="Video", interactive=False, elem_id="video")
                params = gr.JSON(label="Parameters used", elem_id="params")
        with gr.Accordion("Earlier outputs", open=True):
            gallery = gr.Gallery(label=f"{app.outputs} (click one to show it above)", columns=6, height=240,
                                 fit_columns=False, object_fit="cover", allow_preview=False, interactive=False,
                                 elem_id="gallery")
            refresh = gr.Button("Refresh", size="sm")
            shown = gr.State([])  # file names in the order the gallery shows them
        with gr.Accordion("Model", open=app.is_demo or app.files is not None):
            m = _model_picker(app)
        model, load = m["model"], m["load"]

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
            session = request.session_hash
            values = app.status(session), app.preview(session), app.vae_preview(session)
            return tuple(gr.skip() if v is None else v for v in values)

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

        def loaded(load, *args):  # the typed paths stay in their fields; on failure the loaded model stays
            try:
                banner_text = load(*args)
            except gr.Error as e:
                gr.Warning(e.message, title="Model not loaded")
                return (gr.skip(),) * 7 + (f"Model not loaded: {e.message}",)
            s = app.settings()
            return (banner_text, gr.Dropdown(choices=app.model_roots(), value=app.root_value()),
                    gr.Dropdown(choices=list(app.size_presets()), value=s.size), s.frames, s.steps,
                    gr.Dropdown(choices=app.quant_choices(), value=s.quantization), app.plan(s),
                    f"Loaded {app.pipe.model_name}.")

        def load_model(root):
            return loaded(app.load_model, root)

        def load_files(high, low, text_encoder, vae, tokenizer):
            files = ModelFiles.of(high=high, low=low, text_encoder=text_encoder, vae=vae, tokenizer=tokenizer)
            return loaded(app.load_files, files)

        def load_comfyui(folder, high, low, tokenizer):
            return loaded(app.load_files, ModelFiles.of(comfyui=folder, high=high, low=low, tokenizer=tokenizer))

        def list_comfyui(folder, listed):  # the expert dropdowns, filled from the typed folder's diffusion_models/
            folder = str(folder or "").strip()
            if folder == listed:  # Enter, then leaving the field: listed once, the picks made since stay
                return gr.skip(), gr.skip(), gr.skip(), gr.skip()
            try:
                names = app.comfyui_experts(folder)
            except gr.Error as e:
                gr.Warning(e.message, title="No expert files")
                return gr.Dropdown(choices=[], value=None), gr.Dropdown(choices=[], value=None), e.message, None
            high, low = _guess(names, "high"), _guess(names, "low")
            return (gr.Dropdown(choices=names, value=high), gr.Dropdown(choices=names, value=low),
                    f"{len(names)} expert file(s) in {folder}: pick the high-noise and the low-noise one.", folder)

        def initial():
            s = app.settings()
            # single files are named by their file names, as on the terminal (their folder's name says nothing)
            name = app.pipe.root.name if app.files is None else app.pipe.model_name
            ready = f"Ready: {'demo model' if app.is_demo else name} on {app.device.type}."
            values = {n: getattr(s, n) for n in SETTING_NAMES}
            values["quantization"] = gr.Dropdown(choices=app.quant_choices(), value=s.quantization)
            for name in ("lora_high", "lora_low"):  # files copied into the LoRA folder since the start
                values[name] = gr.Dropdown(choices=app.loras.names(), value=getattr(s, name))
            return [*(values[n] for n in SETTING_NAMES), app.plan(s), *listing(), ready]

        start = generate.click(busy, None, generate, concurrency_limit=None, show_progress="hidden")
        gen = start.then(run, set(controls), result, concurrency_limit=None, show_progress_on=[video])
        gen.then(after_run, None, [generate, gallery, shown], concurrency_limit=None, show_progress="hidden")
        cancel.click(stop, None, status, concurrency_limit=None, show_progress="hidden")
        timer.tick(poll, None, [status, preview, vae_image], concurrency_limit=None, show_progress="hidden")
        # trigger_mode="always_last": gradio drops an .input made while the last one's update is pending
        # ("once", its default for .input), which left the plan showing the first of quick edits
        c["preset"].input(fill_preset, set(controls), [*(c[n] for n in PRESET_FIELDS), plan], concurrency_limit=None,
                          trigger_mode="always_last")
        # .input (a person's edit), not .change: a preset's or a model load's own update of these fields
        # already carries its plan, and a .change per filled field would race it with half-updated data
        gr.on([c[n].input for n in PLAN_INPUTS if n != "preset"], show_plan, set(controls), plan,
              concurrency_limit=None, show_progress="hidden", trigger_mode="always_last")
        refresh.click(listing, None, [gallery, shown], concurrency_limit=None)
        gallery.select(open_item, shown, [video, params, status], concurrency_limit=None,
                       trigger_mode="always_last")  # a second pick while the first opens is shown, not dropped
        after_load = [banner, model, c["size"], c["frames"], c["steps"], c["quantization"], plan, status]
        load.click(load_model, model, after_load, concurrency_limit=None, show_progress="hidden")
        pieces = [m[f"file_{n}"] for n in FILE_FIELDS]
        m["load_files"].click(load_files, pieces, after_load, concurrency_limit=None, show_progress="hidden")
        comfyui = [m["comfyui"], m["comfyui_high"], m["comfyui_low"], m["comfyui_tokenizer"]]
        m["load_comfyui"].click(load_comfyui, comfyui, after_load, concurrency_limit=None, show_progress="hidden")
        gr.on([m["comfyui"].submit, m["comfyui"].blur], list_comfyui, [m["comfyui"], m["comfyui_listed"]],
              [m["comfyui_high"], m["comfyui_low"], status, m["comfyui_listed"]], concurrency_limit=None,
              show_progress="hidden", trigger_mode="always_last")  # leaving the field after Enter lists again
        blocks.load(initial, None, [*controls, plan, gallery, shown, status], concurrency_limit=None)
    return blocks


def _model_picker(app: App) -> dict:
    """The three ways to open a model (module docstring), keyed by name; filled with what the app was started
    with (`app.files`, from --high/--low ...)."""
    m, f = {}, app.files or ModelFiles()
    with gr.Tabs(selected="comfyui" if f.comfyui else "files" if f.high else "root"):
        with gr.Tab("Model folder", id="root"):
            with gr.Row():
                m["model"] = gr.Dropdown(app.model_roots(), value=app.root_value(), allow_custom_value=not app.share,
                                         label="Model folder (Wan2.2-T2V-A14B root: official or diffusers layout, or a "
                                         "quantized copy)", scale=5, elem_id="model")
                m["load"] = gr.Button("Load", scale=1, elem_id="load")
        with gr.Tab("Expert files", id="files"):
            given = f if not f.comfyui else ModelFiles()
            for name, label in FILE_FIELDS.items():
                m[f"file_{name}"] = gr.Textbox(getattr(given, name), label=label, elem_id=f"file_{name}",
                                               placeholder="/path/on/this/computer")
            m["load_files"] = gr.Button("Load files", elem_id="load_files")
        with gr.Tab("ComfyUI models folder", id="comfyui"):
            comfy = f if f.comfyui else ModelFiles()  # expert paths given without --ckpt fill the other tab
            names = app.comfyui_experts(comfy.comfyui) if comfy.comfyui else []
            m["comfyui"] = gr.Textbox(comfy.comfyui, label="ComfyUI models/ folder (Enter lists its diffusion_models/; "
                                      "the text encoder and VAE are found in text_encoders/ and vae/)",
                                      elem_id="comfyui", placeholder="/path/to/ComfyUI/models")
            with gr.Row():
                for name, expert in (("high", "High-noise"), ("low", "Low-noise")):
                    m[f"comfyui_{name}"] = gr.Dropdown(names, value=getattr(comfy, name) or None,
                                                       label=f"{expert} expert (in diffusion_models/ or unet/)",
                                                       elem_id=f"comfyui_{name}")
            m["comfyui_tokenizer"] = gr.Textbox(comfy.tokenizer, elem_id="comfyui_tokenizer",
                                                label="Tokenizer folder (google/umt5-xxl; empty: the hub id, "
                                                "downloaded once)")
            m["load_comfyui"] = gr.Button("Load ComfyUI model", elem_id="load_comfyui")
            m["comfyui_listed"] = gr.State(comfy.comfyui or None)  # the folder the dropdowns were filled from
    return m


def _guess(names: list[str], word: str) -> str | None:
    """The one listed name holding `word` ("high" / "low", as Wan2.2's released file names do), else None."""
    hits = [n for n in names if word in n.lower()]
    return hits[0] if len(hits) == 1 else None


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
        c["vae_preview_every"] = gr.Slider(0, MAX_VAE_PREVIEW_EVERY, step=1, value=s.vae_preview_every,
                                           elem_id="vae_preview_every", label="Full VAE preview every N steps (0: "
                                           "off; decodes 4 frames of the current estimate, cost shown in the status)")
    return c


def _outputs(u: Update) -> tuple:
    """An Update as the values of (status, video, params, seed); what it does not carry stays as it is."""
    return (u.status, *(gr.skip() if v is None else v for v in (u.video, u.params, u.seed)))
