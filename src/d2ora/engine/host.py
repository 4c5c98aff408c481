"""PeerHost: the block of peers one process hosts, with their data, optimizer and sampler.

The simulator is one host holding all P peers; a torchrun job has one host per rank holding a
contiguous block (:func:`peer_block`). Everything a host does is per peer and seeded by the
*global* peer id, so peer k trains and samples the same whichever process hosts it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from d2ora.data.tasks import Task
from d2ora.engine.evaluate import collect_layer_inputs
from d2ora.engine.layout import AdapterLayout
from d2ora.engine.local_steps import Collate, LocalTrainer, PeerSampler
from d2ora.engine.peers import PeerModel
from d2ora.engine.state import Stateful, TorchRandomState
from d2ora.mixers.base import LayerInputs


def peer_block(peers: int, world_size: int, rank: int) -> range:
    """The contiguous block of peers ``rank`` hosts: P split as evenly as possible, lower ranks
    taking one more when P is not a multiple of the world size."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    if peers < world_size:
        raise ValueError(f"{peers} peer(s) cannot fill {world_size} processes; start at most {peers}")
    base, extra = divmod(peers, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def fixed_draw(shard: np.ndarray, count: int, seed: Sequence[int]) -> np.ndarray:
    """``count`` examples of ``shard`` drawn by a generator seeded with ``seed`` alone (no state
    to carry across rounds or checkpoints); repeats the shard when it is smaller than ``count``."""
    order = np.random.default_rng([w % (1 << 63) for w in seed]).permutation(shard)
    reps = -(-count // max(1, len(order)))
    return np.tile(order, reps)[:count]


class PeerHost:
    """Hosted peers ``peer_ids`` (global ids) over one frozen model, with their shards."""

    def __init__(
        self,
        peer_ids: range,
        peer_model: PeerModel,
        trainer: LocalTrainer,
        rows: list[dict[str, Any]],
        shards: Sequence[np.ndarray],
        task: Task,
        collate: Collate,
        device: torch.device,
        *,
        batch_size: int,
        seed: int,
        align_examples: int = 4,
        align_max_tokens: int = 512,
    ) -> None:
        if peer_model.peers != len(peer_ids) or len(shards) != len(peer_ids):
            raise ValueError(f"host of peers {list(peer_ids)} got {peer_model.peers} stacked adapters and {len(shards)} shards")
        self.peer_ids = peer_ids
        self.peer_model = peer_model
        self.trainer = trainer
        self.rows = rows
        self.shards = [np.asarray(s, dtype=np.int64) for s in shards]
        self.task = task
        self.collate = collate
        self.device = device
        self.seed = seed
        self.sampler = PeerSampler(self.shards, batch_size, seed, peer_ids=list(peer_ids))
        self.align_examples = align_examples
        self.align_max_tokens = align_max_tokens

    @property
    def layout(self) -> AdapterLayout:
        return self.peer_model.layout()

    def local(self, peer: int) -> int:
        """Row of global peer ``peer`` in this host's stacks."""
        if peer not in self.peer_ids:
            raise KeyError(f"peer {peer} is not hosted here (peers {self.peer_ids.start}..{self.peer_ids.stop - 1})")
        return peer - self.peer_ids.start

    def local_step(self, sequential: bool = False) -> tuple[torch.Tensor, int]:
        """One AdamW step of every hosted peer on its next batch; ``(losses (h,), examples seen)``."""
        features = [[self.rows[i] for i in idx] for idx in self.sampler.draw_all()]
        losses = self.trainer.step(features, sequential=sequential)
        return losses, sum(len(f) for f in features)

    # ------------------------------------------------------------------------------ checkpoints
    def components(self) -> dict[str, Stateful]:
        """What a checkpoint of this host holds, by name (:mod:`d2ora.engine.state`): its peers'
        adapters, the trainer (AdamW, scheduler), the sampler, the drift correction if any, and
        torch's generators (dropout)."""
        parts: dict[str, Stateful] = {"host": self, "trainer": self.trainer, "sampler": self.sampler}
        correction = self.trainer.correction
        if correction is not None and hasattr(correction, "state_dict"):  # step hooks may keep no state
            parts["drift"] = correction
        parts["rng"] = TorchRandomState(self.device)
        return parts

    def state_dict(self) -> dict[str, Any]:
        """The hosted peers' flat adapters, and which peers and layout they are (checked on load)."""
        return {"adapters": self.peer_model.flat(), "peer_ids": [self.peer_ids.start, self.peer_ids.stop],
                "layout": self.layout.digest()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mine = [self.peer_ids.start, self.peer_ids.stop]
        if list(state["peer_ids"]) != mine:
            raise ValueError(f"it holds peers {list(state['peer_ids'])}, this process hosts {mine}")
        if state["layout"] != self.layout.digest():
            raise ValueError("it was written for a different adapter layout (model, targets or rank)")
        self.peer_model.load_flat(state["adapters"].to(self.device))

    def layer_inputs(self, key: Sequence[int]) -> LayerInputs:
        """Every hosted peer's layer inputs on a batch of its own data, drawn from ``key`` (e.g.
        round and step) and the global peer id; indexed by global peer id (for DIMAT)."""
        picks = [fixed_draw(shard, self.align_examples, [self.seed + 1, peer, *key])
                 for peer, shard in zip(self.peer_ids, self.shards)]
        batch = {k: v.to(self.device) for k, v in self.collate([self.rows[i] for p in picks for i in p]).items()}
        captured = collect_layer_inputs(self.peer_model, batch, self.align_max_tokens,
                                        seeds=[hash_seed(self.seed, peer, *key) for peer in self.peer_ids])

        def by_peer(peer: int, layer: str) -> torch.Tensor:
            return captured(self.local(peer), layer)

        return by_peer


def hash_seed(*words: int) -> int:
    """One non-negative 63-bit seed from several integers (numpy's SeedSequence mixes them)."""
    return int(np.random.SeedSequence([w % (1 << 63) for w in words]).generate_state(1, np.uint64)[0] >> 1)
