"""TensorBoard event files for a run (``tensorboard --logdir runs/``), a round listener.

Scalars per round, the x axis being the round: mean train loss, consensus and mean-peer test
metric, consensus distances, bytes; per-peer scalars are grouped under ``peers/<name>/peer-<k>`` so
TensorBoard draws one chart per quantity with a line per peer.
"""

from __future__ import annotations

import math
from pathlib import Path

from d2ora.engine.records import RoundRecord
from d2ora.report.rows import GENERATIVE_ACCURACY

DIRECTORY = "tensorboard"
#: Metrics logged next to the headline one when a task returns them.
SECONDARY_METRICS = (GENERATIVE_ACCURACY,)


class TensorBoardLog:
    def __init__(self, output_dir: Path, metric: str, purge_after: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        # A resumed run rewrites the rounds after its checkpoint; purge_step drops the old events.
        self.writer = SummaryWriter(log_dir=str(Path(output_dir) / DIRECTORY),
                                    purge_step=None if purge_after is None else purge_after + 1)
        self.metric = metric

    def _scalar(self, tag: str, value: float | None, step: int) -> None:
        if value is not None and math.isfinite(value):
            self.writer.add_scalar(tag, value, step)

    def on_round(self, record: RoundRecord) -> None:
        step = record.round
        losses = [v for v in record.train_loss if v is not None]
        if losses:
            self._scalar("train/loss_mean", sum(losses) / len(losses), step)
        for k, loss in enumerate(record.train_loss):
            self._scalar(f"peers/train_loss/peer-{k}", loss, step)
        self._scalar("bytes/sent_total", float(record.bytes_sent_total), step)
        for k, sent in enumerate(record.bytes_sent):
            self._scalar(f"peers/bytes_sent/peer-{k}", float(sent), step)
        self._scalar("samples_seen", float(record.samples_seen), step)
        evaluation = record.evaluation
        if evaluation is not None:
            metric = self.metric
            self._scalar(f"test/consensus_{metric}", evaluation.consensus_test.get(metric), step)
            mean = evaluation.mean_peer_test
            if mean is not None:
                self._scalar(f"test/mean_peer_{metric}", mean[metric], step)
            # Secondary metrics a task reports next to its headline (sft's generative accuracy); named
            # ones only, so other tasks' event files keep exactly their tags.
            for extra in SECONDARY_METRICS:
                if extra != metric and extra in evaluation.consensus_test:
                    self._scalar(f"test/consensus_{extra}", evaluation.consensus_test[extra], step)
                    if mean is not None and extra in mean:
                        self._scalar(f"test/mean_peer_{extra}", mean[extra], step)
            for k, result in enumerate(evaluation.peer_test or []):
                self._scalar(f"peers/test_{metric}/peer-{k}", result.get(metric), step)
            for k, result in enumerate(evaluation.peer_val):
                if result is not None:
                    self._scalar(f"peers/val_{metric}/peer-{k}", result.get(metric), step)
            for key, value in evaluation.consensus_distance.items():
                self._scalar(f"consensus_distance/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
