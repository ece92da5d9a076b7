"""What the model picker opens besides a model root: two expert files with their text encoder and VAE,
or a ComfyUI `models/` folder with the two experts named. Plain Python, no gradio.

The pieces are mapped onto `wan_lite.checkpoint` as the CLI maps its flags (`wan_lite.generate.
model_from_args`): `--high/--low` with `--text-encoder` and `--vae` -> `open_components`; a ComfyUI
`models/` folder with `--high/--low` naming files in `diffusion_models/` (or `unet/`) -> `open_comfyui`,
which finds the umt5 encoder in `text_encoders/` (or `clip/`) and the Wan2.1 VAE in `vae/`; a text
encoder or VAE named as well replaces the one found there. Every piece is identified from its header
(`wan_lite.formats`) before any weight is read, so a LoRA, a VAE or an I2V expert given as an expert is
refused by name here, with that module's message.

- `ModelFiles`: the picker's fields (paths as typed; "" for a field left empty).
- `open_files(files) -> ModelRoot`: the checked model; ValueError / CheckpointError / FileNotFoundError
  naming the field to fix.
- `comfyui_experts(folder) -> list[str]`: the expert files a ComfyUI folder offers (the dropdowns).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from wan_lite.checkpoint import COMFYUI_FOLDERS, ModelRoot, open_comfyui, open_components

EXPERT_SUFFIXES = (".safetensors", ".gguf")  # what ComfyUI's diffusion_models/ (and unet/ for GGUF) hold


@dataclass(frozen=True)
class ModelFiles:
    """A model given as pieces: `comfyui` a ComfyUI models/ folder ("" : none) and `high`/`low` file names
    in it, or `high`/`low` paths with `text_encoder` and `vae`; `tokenizer` the google/umt5-xxl tokenizer
    folder ("": the hub id, cached or downloaded by transformers)."""

    high: str = ""
    low: str = ""
    text_encoder: str = ""
    vae: str = ""
    tokenizer: str = ""
    comfyui: str = ""

    @classmethod
    def of(cls, **fields) -> ModelFiles:
        """From the ui's or the command line's values (None and surrounding blanks read as empty)."""
        return cls(**{k: str(v or "").strip() for k, v in fields.items()})


def _path(text: str) -> Path | None:
    return Path(text).expanduser() if text else None


def open_files(files: ModelFiles) -> ModelRoot:
    """The model the pieces make (module docstring). Raises ValueError naming a field left empty, and
    wan_lite.checkpoint's CheckpointError / FileNotFoundError for a wrong or missing file."""
    if not files.high or not files.low:
        where = f"in {files.comfyui}/diffusion_models" if files.comfyui else "(.safetensors or .gguf files)"
        raise ValueError(f"Choose both experts {where}: the high-noise and the low-noise one.")
    tokenizer = _path(files.tokenizer)
    if files.comfyui:
        folder = _path(files.comfyui)
        if not folder.is_dir():
            raise FileNotFoundError(f"No folder {folder}: give ComfyUI's models/ folder (the one holding "
                                    "diffusion_models/, text_encoders/ and vae/).")
        if files.text_encoder and files.vae:  # both named: nothing to look for in the folder
            found = None
        else:
            found = open_comfyui(folder, high=files.high, low=files.low, tokenizer=tokenizer)
        if found is not None and not files.text_encoder and not files.vae:
            return found
        experts = [folder / sub / name for name in (files.high, files.low) for sub in COMFYUI_FOLDERS["experts"]]
        high = next((p for p in experts[:2] if p.is_file()), _path(files.high))
        low = next((p for p in experts[2:] if p.is_file()), _path(files.low))
        return open_components(high, low, text_encoder=_path(files.text_encoder) or found.text_encoder,
                               vae=_path(files.vae) or found.vae, tokenizer=tokenizer,
                               name=f"{folder} ({files.high} + {files.low})")
    missing = [label for label, value in (("text encoder", files.text_encoder), ("VAE", files.vae)) if not value]
    if missing:
        raise ValueError(f"With two expert files also give the {' and the '.join(missing)} file "
                         "(umt5_xxl_fp16.safetensors, wan_2.1_vae.safetensors), or use a ComfyUI models/ folder, "
                         "where they are found.")
    return open_components(_path(files.high), _path(files.low), text_encoder=_path(files.text_encoder),
                           vae=_path(files.vae), tokenizer=tokenizer)


def comfyui_experts(folder: str | os.PathLike) -> list[str]:
    """File names of the experts a ComfyUI models/ folder offers (in diffusion_models/, then unet/), sorted;
    ValueError naming the folder to give when it has neither."""
    text = str(folder or "").strip()
    root = Path(text).expanduser()
    subs = [root / sub for sub in COMFYUI_FOLDERS["experts"] if (root / sub).is_dir()]
    if text and not root.is_dir():
        raise ValueError(f"No folder {root}: check the path (ComfyUI's models/ folder, e.g. ComfyUI/models).")
    if not text or not subs:
        raise ValueError(f"{root if text else 'No folder given'}: no diffusion_models/ or unet/ in it; give "
                         "ComfyUI's models/ folder (e.g. ComfyUI/models).")
    names = {p.name for sub in subs for p in sub.iterdir() if p.suffix in EXPERT_SUFFIXES and p.is_file()}
    return sorted(names)


def describe_files(model: ModelRoot) -> str:
    """One line naming the pieces by file name, e.g. for the plan text."""
    name = lambda p: Path(p).name if isinstance(p, Path) else str(p)  # noqa: E731 - a hub id stays whole
    return (f"high {name(model.high)} · low {name(model.low)} · text encoder {name(model.text_encoder)} · "
            f"VAE {name(model.vae)} · tokenizer {name(model.tokenizer)}")
