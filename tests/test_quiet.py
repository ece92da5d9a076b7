"""Third-party lines that a wan-lite run should not print (found by a user trial).

bitsandbytes, imported by diffusers whenever it is installed, warns at import on CPUs with AVX512-BF16 that its
CPU 4-bit kernel could not be fetched from the hub (advising trust_remote_code); `import wan_lite` silences
that logger. The warning itself depends on the CPU and the network, so its logger is driven directly here,
with and without wan_lite imported first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WARN = "import logging; logging.getLogger('bitsandbytes.backends.cpu.ops').warning('bnb-cpu-kernel-noise')"


@pytest.mark.parametrize("first, printed", [("", True), ("import wan_lite; ", False)])
def test_the_bitsandbytes_cpu_kernel_warning_is_silenced_by_wan_lite(first, printed):
    run = subprocess.run([sys.executable, "-c", first + WARN], cwd=REPO, capture_output=True, text=True, check=True)
    assert ("bnb-cpu-kernel-noise" in run.stderr) is printed, run.stderr
