"""A process's peak memory, for the run summary and the report.

On a CUDA device the figure is ``torch.cuda.max_memory_allocated``: the tensors' high-water mark
since the process started (what a practitioner compares with the card's memory). On CPU it is the
process's resident-set high-water mark (``getrusage``'s ``ru_maxrss``): torch has no allocator
statistics for CPU tensors, and the RSS peak is what the operating system charges (the frozen base,
the adapters, activations, and the Python runtime itself).
"""

from __future__ import annotations

import resource
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the report imports describe_kind and must not pull torch in
    import torch

CPU_RSS = "cpu_rss"
CUDA_ALLOCATED = "cuda_allocated"


def peak_memory(device: torch.device | str) -> tuple[int, str]:
    """``(bytes, kind)``: this process's peak memory on ``device`` and how it was measured."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device)), CUDA_ALLOCATED
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return int(peak if sys.platform == "darwin" else peak * 1024), CPU_RSS


def describe_kind(kind: str) -> str:
    """The kind as the report says it."""
    return {CPU_RSS: "CPU resident-set peak", CUDA_ALLOCATED: "CUDA tensors' peak (max_memory_allocated)"}.get(kind, kind)
