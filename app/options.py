"""The choices the controls offer beyond the plain numbers: sampler presets and the LoRA folder.

- `PRESETS`: "official" (wan/configs/wan_t2v_A14B.py: 40 UniPC steps, shift 12, guidance 4.0 / 3.0) and
  "lightning" (`SamplingConfig.lightning()`: the 4-step Wan2.2-Lightning recipe, Euler at shift 5 on the
  Lightning grid without CFG; it needs the Lightning LoRA pair, HIGH on the high-noise expert and LOW
  on the low-noise one). Picking one fills steps, shift, guidance and solver; the grid comes with it.
- `STEP_CACHES`: step caching off (the default), EasyCache's published Wan2.2 setting, or a fixed half of
  each expert's steps (`wan_lite.config.StepCache`); quality is not judged here.
- `LoraFolder`: the `.safetensors` files directly inside `--loras DIR`, offered by file name; a name
  is resolved only inside that folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from wan_lite.config import SamplingConfig, StepCache

STEP_CACHES = {"off": StepCache(), "easycache (threshold 0.06)": StepCache.easycache(),
               "50% of the steps": StepCache.half()}


@dataclass(frozen=True)
class Preset:
    label: str
    sampling: SamplingConfig

    def fills(self) -> dict:
        """The Settings fields this preset sets."""
        s = self.sampling
        return {"steps": s.steps, "shift": s.shift, "guidance_high": s.guidance_high, "guidance_low": s.guidance_low,
                "solver": s.solver}


PRESETS = {
    "official": Preset("official (40 steps, CFG)", SamplingConfig()),
    "lightning": Preset("Lightning (4 steps, needs the Lightning LoRAs)", SamplingConfig.lightning()),
}


class LoraFolder:
    """LoRA files offered in the pickers: `*.safetensors` directly inside `folder` (None: no folder given)."""

    def __init__(self, folder: str | os.PathLike | None):
        self.folder = Path(folder).expanduser().resolve() if folder else None

    def names(self) -> list[str]:
        if self.folder is None or not self.folder.is_dir():
            return []
        return sorted(p.name for p in self.folder.glob("*.safetensors") if p.is_file())

    def path(self, name: str) -> Path:
        """The file of a listed name; ValueError naming the folder otherwise."""
        if self.folder is None:
            raise ValueError("No LoRA folder: start the app with --loras DIR (a folder of .safetensors LoRAs).")
        path = (self.folder / str(name)).resolve()
        if path.parent != self.folder or name not in self.names():
            raise ValueError(f"LoRA {name!r} is not in {self.folder}: pick one of the listed files "
                             "(copy new ones into that folder and reload the page).")
        return path
