"""Peak memory of a training run: allocated bytes on a GPU, the process's peak resident set on the CPU.
train reports it in its log and metrics.json; bench reports it beside speed."""

from __future__ import annotations

import os
import re
import resource

import torch


class PeakMemory:
    """Peak memory from `start()` on: allocated bytes on a GPU; on the CPU the process's peak resident set
    (Linux lets it be reset, so model loading before `start()` is not counted; elsewhere it is)."""

    def __init__(self, device: str):
        self.device = device
        self.since_start = True

    def start(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM, the peak resident set size
        except OSError:
            self.since_start = False

    def peak_bytes(self) -> int:
        if self.device.startswith("cuda"):
            return torch.cuda.max_memory_allocated()
        try:
            with open("/proc/self/status") as f:
                found = re.search(r"VmHWM:\s+(\d+) kB", f.read())
            if found:
                return int(found.group(1)) * 1024
        except OSError:
            pass
        self.since_start = False
        scale = 1 if os.uname().sysname == "Darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def describe(self) -> str:
        """What peak_bytes counts, in words."""
        if self.device.startswith("cuda"):
            return "allocated"
        return "resident, training only" if self.since_start else "resident, whole process"
