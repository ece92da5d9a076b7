"""The layering the README promises: the runtime never imports the offline toolchain, and nothing
but `wan_lite.checkpoint` knows the on-disk layouts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNTIME_MODULES = ["wan_lite", "wan_lite.t2v", "wan_lite.generate", "wan_lite.residency", "wan_lite.planner",
                   "wan_lite.parallel", "wan_lite.checkpoint", "wan_lite.quantized.format",
                   "wan_lite.quantized.backends", "wan_lite.quantized.linear", "wan_lite.quantized.kernels"]


def test_runtime_never_imports_the_toolchain():
    """Import every runtime module in a fresh interpreter: neither `quant` nor `calib` gets loaded."""
    code = ("import importlib, sys\n"
            f"for m in {RUNTIME_MODULES!r}: importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('quant', 'calib'))\n"
            "print(','.join(bad))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "", f"the runtime imported the toolchain: {proc.stdout.strip()}"


def test_layout_knowledge_lives_in_checkpoint():
    """Layout markers and layout detection appear in wan_lite/checkpoint.py (and the quantized format
    that defines its own marker), nowhere else in the runtime."""
    markers = re.compile(r"detect_layout\(|high_noise_model|transformer_2|model_index\.json|Wan2\.1_VAE\.pth"
                         r"|models_t5_umt5")
    allowed = {"checkpoint.py"}
    offenders = []
    for f in sorted((REPO / "wan_lite").rglob("*.py")):
        if f.name in allowed:
            continue
        code = "\n".join(line for line in f.read_text().splitlines() if not line.lstrip().startswith("#"))
        code = re.sub(r'"""(.|\n)*?"""', "", code)  # docstrings may name the layouts
        if markers.search(code):
            offenders.append(f.relative_to(REPO).as_posix())
    assert offenders == [], f"layout knowledge outside checkpoint.py: {offenders}"
