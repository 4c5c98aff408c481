"""Label-prior logit adjustment: offsets by hand, the adjusted per-peer loss against cross-entropy
written out per peer, and a run whose peers train with their own shard's prior."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d2ora.data.tasks import ClassificationTask
from d2ora.engine.label_prior import FLOOR, log_prior_offsets
from d2ora.engine.metrics_log import read_rows
from d2ora.recipes.session import open_session
from d2ora.recipes.simulate import simulate
from tests.conftest import simulate_config


pytestmark = pytest.mark.usefixtures("one_thread")


def test_offsets_are_tau_times_the_log_of_each_peers_label_frequencies() -> None:
    offsets = log_prior_offsets([np.array([0, 0, 1]), np.array([2, 2, 2, 2])], num_labels=3, tau=0.5)
    expected = torch.tensor([[math.log(2 / 3), math.log(1 / 3), math.log(FLOOR)],
                             [math.log(FLOOR), math.log(FLOOR), 0.0]]) * 0.5
    torch.testing.assert_close(offsets, expected)
    with pytest.raises(ValueError, match="peer 1 has no training labels"):
        log_prior_offsets([np.array([0]), np.array([], dtype=np.int64)], 2, 1.0)
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        log_prior_offsets([np.array([0, 2])], 2, 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        log_prior_offsets([np.array([0])], 2, -1.0)


class FixedLogits(nn.Module):
    """A stand-in model whose logits are given (so the loss is all that is tested)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.logits})()


def test_adjusted_peer_losses_equal_cross_entropy_of_shifted_logits_per_peer() -> None:
    g = torch.Generator().manual_seed(0)
    peers, rows, classes = 3, 4, 5
    logits = torch.randn(peers * rows, classes, generator=g)
    labels = torch.randint(0, classes, (peers * rows,), generator=g)
    offset = torch.randn(peers, classes, generator=g)
    batch = {"input_ids": torch.ones(peers * rows, 2, dtype=torch.long), "attention_mask": torch.ones(peers * rows, 2),
             "labels": labels}
    task = ClassificationTask(label_names=[str(c) for c in range(classes)])
    got = task.peer_losses(FixedLogits(logits), batch, peers, logit_offset=offset)
    for k in range(peers):
        own = slice(k * rows, (k + 1) * rows)
        reference = F.cross_entropy(logits[own] + offset[k], labels[own])
        torch.testing.assert_close(got[k], reference)
    plain = task.peer_losses(FixedLogits(logits), batch, peers)
    assert not torch.allclose(plain, got)


TINY = {
    "peers": 4, "rounds": 1, "local_steps": 2, "batch_size": 2, "max_length": 24, "max_train_samples": 90,
    "max_test_samples": 12, "eval_batch_size": 12, "min_partition_size": 5, "r": 2, "lr": 3e-3,
    "save_merged": False, "save_adapters": False, "tensorboard": False, "eval_peers": False, "mixer": "decaf",
    "dirichlet_alpha": 0.3,
}


def test_each_hosted_peer_trains_with_its_own_shard_prior() -> None:
    config = simulate_config(**TINY, logit_adjust=1.0)
    session = open_session(config, torch.device("cpu"), block=lambda peers: range(1, peers))  # peers 1..3 here
    offsets = session.host.trainer.logit_offsets
    assert offsets is not None and offsets.shape == (3, session.data.n_classes)
    for row, peer in enumerate(range(1, config.network.peers)):
        counts = Counter(session.data.train_rows[i]["labels"] for i in session.data.train_shards[peer])
        total = sum(counts.values())
        for c in range(session.data.n_classes):
            expected = math.log(max(counts.get(c, 0) / total, FLOOR))
            assert offsets[row, c].item() == pytest.approx(expected, rel=1e-6)


def test_adjusted_run_trains_differently_and_is_named(tmp_path: Path) -> None:
    plain = simulate(simulate_config(**TINY, output_dir=tmp_path / "plain"))
    adjusted = simulate(simulate_config(**TINY, logit_adjust=1.0, output_dir=tmp_path / "adjusted"))
    assert adjusted["name"] == "decaf+la1" and adjusted["logit_adjust"] == 1.0 and plain["logit_adjust"] == 0.0
    assert read_rows(tmp_path / "adjusted")[1]["train_loss"] != read_rows(tmp_path / "plain")[1]["train_loss"]


@pytest.mark.parametrize(("changes", "message"), [
    ({"logit_adjust": 1.0, "mixer": "centralized"}, "mode centralized"),
    ({"logit_adjust": 1.0, "task": "causal_lm", "partition": "iid"}, "needs model.task classification"),
    ({"logit_adjust": -0.5}, "logit_adjust"),
])
def test_config_refuses_logit_adjustment_where_undefined(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        simulate_config(**changes)
