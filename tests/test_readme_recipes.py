"""README's two no-weights recipes run as written: each bash block is read out of README.md and run in a shell
(the demo root built into a temporary cache, HOME pointed there so `~/.cache/wan-lite/demo-v1` is it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from app import demo

REPO = Path(__file__).resolve().parents[1]


def bash_block_after(marker: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(marker)
    return re.search(r"```bash\n(.*?)```", text[start:], re.S).group(1)


@pytest.mark.parametrize("marker, out, needs", [
    ("No weights yet? The app's tiny demo model", "demo.mp4", "wan_lite.generate --ckpt ~/.cache/wan-lite/demo-v1"),
    ("No weights yet? Tiny random experts", "files.mp4", "wan_lite.generate --high"),
])
def test_the_recipes_without_weights_run(tmp_path, marker, out, needs):
    script = bash_block_after(marker)
    assert needs in script
    home = tmp_path / "home"
    demo.ensure_demo_checkpoint(home / ".cache" / "wan-lite")  # what the recipes' first line builds
    env = {**os.environ, "HOME": str(home), "WAN_LITE_CACHE": str(home / ".cache" / "wan-lite"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / out).stat().st_size > 0
    assert f"wrote {out} (9 frames, 64x64" in proc.stdout + proc.stderr
