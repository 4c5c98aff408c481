"""The console during a run: a progress bar over local steps and one line per evaluated round
(a round listener)."""

from __future__ import annotations

from types import TracebackType

import torch
from rich.console import Console

from d2ora.engine.records import RoundRecord
from d2ora.runtime_support import progress_bar


def round_line(record: RoundRecord, metric: str) -> str:
    """``round 3: consensus accuracy 84.0%, peers 80.1% (min 70.0%, max 88.0%), consensus dist B·A 1.2``."""
    fmt = (lambda v: f"{100 * v:.1f}%") if metric == "accuracy" else (lambda v: f"{v:.2f}")
    evaluation = record.evaluation
    assert evaluation is not None
    parts = [f"round {record.round}: consensus {metric} {fmt(evaluation.consensus_test[metric])}"]
    mean = evaluation.mean_peer_test
    if mean:
        parts.append(f"peers {fmt(mean[metric])} (min {fmt(mean['min'])}, max {fmt(mean['max'])})")
    parts.append(f"consensus dist B·A {evaluation.consensus_distance['product']:.3g}")
    return ", ".join(parts)


class ConsoleView:
    """Use as a context manager around the loop; ``on_step`` after each local step."""

    def __init__(self, console: Console, metric: str, rounds: int, local_steps: int, start_round: int = 0) -> None:
        self.console, self.metric, self.rounds = console, metric, rounds
        self.progress = progress_bar(console)
        self.bar = self.progress.add_task(f"round {start_round + 1}", total=rounds * local_steps,
                                          completed=start_round * local_steps, loss="-")

    def __enter__(self) -> ConsoleView:
        self.progress.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.progress.__exit__(kind, exc, tb)

    def on_step(self, round_index: int, losses: torch.Tensor) -> None:
        self.progress.update(self.bar, advance=1, description=f"round {round_index}/{self.rounds}", loss=f"{losses.mean():.4f}")

    def on_round(self, record: RoundRecord) -> None:
        if record.evaluation is not None:
            self.progress.console.print(round_line(record, self.metric))
