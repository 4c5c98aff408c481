"""A process's peak memory: the figure the summary reports against the kernel's own record, and
the line the report prints from it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from d2ora.engine.memory import CPU_RSS, peak_memory
from d2ora.report.markdown import run_markdown
from d2ora.report.model import RunSummary


def kernel_status_bytes(field: str) -> int:
    # /proc's VmHWM is the same high-water mark as getrusage's ru_maxrss, read through another interface.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cpu_peak_is_the_kernels_high_water_mark_and_rises_above_it() -> None:
    before, kind = peak_memory("cpu")
    assert kind == CPU_RSS
    assert abs(before - kernel_status_bytes("VmHWM")) <= 4 * 2**20  # the same counter, read a moment apart
    # Touch enough new memory to pass the old peak by 64 MB: the peak must follow.
    extra = before - kernel_status_bytes("VmRSS") + 64 * 2**20
    big = torch.ones(extra // 4)
    after, _ = peak_memory("cpu")
    assert after >= before + 60 * 2**20
    del big


def test_report_shows_each_processs_peak() -> None:
    summary = RunSummary.model_validate({"name": "run", "mixer": "decaf", "metric": "accuracy", "final": None,
                                         "peak_memory_mb": [1234.5, 987.0], "peak_memory_kind": "cpu_rss"})
    text = run_markdown(Path("."), summary, [])
    assert "- peak memory per process: 1,234, 987 MB (CPU resident-set peak)" in text
