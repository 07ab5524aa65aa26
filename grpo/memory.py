"""Peak memory of this process, the way the memory plan and the `peak_memory_gib` metric count it.

On a GPU: the device memory PyTorch allocated (`torch.cuda.max_memory_allocated`), reset per step. On a
CPU: the process's peak resident set (Linux `VmHWM`), which `reset_peak` rewinds to the current resident
set by writing 5 to `/proc/self/clear_refs`, less the shared memory it maps (Ray's object store pages; see
`peak_bytes`); where that is not possible (not Linux) the peak since the process started (`ru_maxrss`).
Shared pages touched during the window are subtracted whole, so a window in which the process wrote large
objects may read low by up to what it wrote.

Not here: predicting memory (grpo.memplan).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

GIB = 1024**3


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def resident_bytes() -> int:
    """The process's resident set now (0 where /proc is missing)."""
    kib = _status_kib("VmRSS")
    return (kib or 0) * 1024


def reset_peak(device: torch.device | None = None) -> None:
    """Start a new peak window for `device` (the CPU when None or not CUDA)."""
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_bytes(device: torch.device | None = None) -> int:
    """The peak since the last `reset_peak`: device memory on CUDA, the resident set on the CPU less the
    shared memory mapped now (Ray's object store: every page of it this process wrote or read stays in its
    resident set, and is the object store's memory, not this process's; so a Ray worker's plain VmHWM
    climbs with every object it passes until it covers the whole store)."""
    if device is not None and device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    kib = _status_kib("VmHWM")
    if kib is None:  # no /proc: ru_maxrss is KiB on Linux, bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)
    return max(kib - (_status_kib("RssShmem") or 0), 0) * 1024
