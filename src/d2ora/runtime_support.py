"""What every run recipe needs around its loop: seeding, the device, quiet dataset maps, a progress bar.

Shared by the centralised (recipes/train.py) and decentralised (recipes/simulate.py) recipes so
both seed, pick a device and report progress the same way.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (data order, head and adapter init)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``"auto"``: cuda when available, else cpu; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Hide `datasets`' per-map progress bars; the run has its own progress display."""
    import datasets  # heavy: only when a run actually loads data

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def progress_bar(console: Console) -> Progress:
    """The training progress bar; every task added to it must carry a ``loss`` field (text)."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=False,
    )
