"""Host memory of this process, private (anonymous) and file-backed, now and at its peak.

What is read (Linux, /proc/self/status, in kB):
- RssAnon: private memory (heap, CPU tensors, the experts' pinned buffers where the driver maps them as
  anonymous memory); this is what runs a machine out of RAM;
- RssFile: file-backed pages mapped by this process (memory-mapped checkpoints in the page cache,
  shared libraries): reclaimable, shared with the page cache;
- RssShmem: shared memory (a checkpoint memory-mapped from /dev/shm counts here, not in RssFile);
- VmHWM: the kernel's own peak of the total resident set (exact, but not split).
The kernel keeps no peak of each part, so `PeakSampler` (a daemon thread) reads the file every
`interval` seconds (default 0.05 s, about 30 us a read) and keeps the maximum of each field; a spike
shorter than the interval can be missed in the parts (VmHWM still has it in the total). Pinned host
memory is also taken from PyTorch's pinned allocator (`torch.cuda.host_memory_stats`, its peak), since
whether the driver's pinned pages show up in RssAnon depends on how they were allocated.

Elsewhere (macOS, Windows): no split is available; psutil's resident set is reported as private, and
the peak is the larger of what the sampler saw and the OS's own peak (ru_maxrss / peak_wset).
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, fields
from pathlib import Path

import psutil
import torch

STATUS = Path("/proc/self/status")
GB = 1e9


@dataclass(frozen=True)
class HostMemory:
    """Bytes of host memory (a sample, or the peak of each field over a run)."""

    private: int  # RssAnon: anonymous memory
    file: int  # RssFile: file-backed pages mapped (page cache of memory-mapped files, libraries)
    shmem: int = 0  # RssShmem: shared memory (files in /dev/shm mapped)
    hwm: int = 0  # VmHWM: the kernel's peak of the total resident set (0 where unknown)
    pinned: int = 0  # pinned host memory held by PyTorch's allocator (its peak in a `PeakSampler`)

    def max(self, other: HostMemory) -> HostMemory:
        return HostMemory(*(max(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)))

    def to_dict(self) -> dict[str, float]:
        """In GB (1e9 bytes), for JSON."""
        return {f"{f.name}_gb": round(getattr(self, f.name) / GB, 3) for f in fields(self)}

    def describe(self) -> str:
        """'peak host RAM 12.30 GB private (4.10 pinned) + 14.90 GB file-backed (+ 0.00 shmem), VmHWM 27.20 GB'."""
        return (f"{self.private / GB:.2f} GB private ({self.pinned / GB:.2f} pinned) + {self.file / GB:.2f} GB "
                f"file-backed (+ {self.shmem / GB:.2f} shmem), VmHWM {self.hwm / GB:.2f} GB")


def parse_status(text: str) -> HostMemory:
    """The fields of a /proc/<pid>/status text; raises ValueError when RssAnon or RssFile is missing
    (kernels before 4.5)."""
    kb = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "RssShmem", "VmHWM"):
            kb[key] = int(value.split()[0]) * 1024
    if "RssAnon" not in kb or "RssFile" not in kb:
        raise ValueError("/proc/self/status has no RssAnon/RssFile (Linux 4.5 or later needed)")
    return HostMemory(private=kb["RssAnon"], file=kb["RssFile"], shmem=kb.get("RssShmem", 0), hwm=kb.get("VmHWM", 0))


def _pinned(peak: bool) -> int:
    """Pinned bytes PyTorch's host allocator holds (its peak with `peak`); 0 before CUDA starts."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return 0
    return int(torch.cuda.host_memory_stats().get(f"allocated_bytes.{'peak' if peak else 'current'}", 0))


def _os_peak() -> int:
    if sys.platform == "win32":
        return psutil.Process().memory_info().peak_wset
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS reports bytes, Linux KiB


def host_memory(peak_pinned: bool = False) -> HostMemory:
    """This process's host memory now (see the module docstring for what each field is)."""
    if STATUS.exists():
        m = parse_status(STATUS.read_text())
    else:  # no split available: the resident set as private
        m = HostMemory(private=psutil.Process().memory_info().rss, file=0, hwm=_os_peak())
    return HostMemory(m.private, m.file, m.shmem, m.hwm, _pinned(peak_pinned))


class PeakSampler:
    """The peak of each `HostMemory` field while it runs: `with PeakSampler() as s: ...; s.peak`."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = host_memory()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wan-lite-hostmem", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = self.peak.max(host_memory())

    def start(self) -> PeakSampler:
        self._thread.start()
        return self

    def stop(self) -> HostMemory:
        """Stop sampling; the peak, with a last sample, the pinned allocator's peak and the OS's."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.peak = self.peak.max(host_memory(peak_pinned=True))
        if not STATUS.exists():
            self.peak = self.peak.max(HostMemory(private=0, file=0, hwm=_os_peak()))
        return self.peak

    def __enter__(self) -> PeakSampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
