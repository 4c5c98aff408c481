"""Local training of P peers at once: peer-batched forward/backward and one fused AdamW step.

Every peer's batch goes through the shared frozen base in one pass (peer-major rows), in peer
groups of ``group_size`` so activations stay bounded for many peers. The loss is the *sum* of each
peer's own mean loss, so peer k's parameters (slice k of every stack) get exactly the gradient of
peer k's loss. Clipping is per peer (a global clip would couple the peers), and AdamW is
element-wise, so one optimizer over the stacks is P independent optimizers.

``step(..., sequential=True)`` runs the same step one peer at a time (each peer's batch padded on
its own): the reference the peer-batched path is checked against.

Gradient accumulation (``grad_accum`` = G > 1) splits every peer's examples of a step into G
micro-batches (peer k's part j is the j-th of G near-equal slices of its examples, the same slice
sizes for every peer, so each micro-batch stays peer-major with equal counts) and runs a forward
and backward per micro-batch before the one clipped AdamW step. Micro-batch j's per-peer mean loss
is weighted by ``u_jk / Σ_j u_jk``, u the terms it averages over (examples, or target tokens for a
causal LM: ``Task.peer_loss_units``), so the accumulated loss of peer k *is* its mean loss over
all the step's examples (token-weighted for a causal LM), the loss of one big batch, and so is its
gradient, up to float summation order (each micro-batch is padded to its own longest row, which
changes no unpadded position). Clipping and AdamW then see the big batch's gradient. With dropout
on (adapter or ``base_dropout``) the masks differ, so equality then holds in distribution only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from d2ora.activation_checkpointing import enable_checkpointing
from d2ora.data.tasks import Batch, Task
from d2ora.engine.peers import PeerModel
from d2ora.models import base_autocast
from d2ora.optim import adamw_groups, linear_schedule, micro_batch_weights, micro_batches

Collate = Callable[[list[dict[str, Any]]], Batch]


class PeerSampler:
    """Each peer draws training batches from its own shard: a fresh seeded permutation per local
    epoch, wrapping into the next one mid-batch. A shard smaller than the batch repeats examples
    within a batch (a peer with little data still takes full steps). Each peer's generator is
    seeded by ``(seed, its global id)`` (``peer_ids``, default 0..n-1), so a peer draws the same
    batches whichever process hosts it."""

    def __init__(self, shards: Sequence[np.ndarray], batch_size: int, seed: int,
                 peer_ids: Sequence[int] | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        empty = [k for k, shard in enumerate(shards) if len(shard) == 0]
        if empty:
            raise ValueError(f"peer(s) {empty} hold no training examples")
        self.shards = [np.asarray(s, dtype=np.int64) for s in shards]
        self.batch_size = batch_size
        ids = list(range(len(shards))) if peer_ids is None else list(peer_ids)
        if len(ids) != len(shards):
            raise ValueError(f"{len(ids)} peer ids for {len(shards)} shards")
        self._rngs = [np.random.default_rng([seed, k]) for k in ids]
        self._orders = [rng.permutation(shard) for rng, shard in zip(self._rngs, self.shards)]
        self._positions = [0] * len(shards)

    @property
    def peers(self) -> int:
        return len(self.shards)

    def draw(self, peer: int) -> np.ndarray:
        """The next ``batch_size`` example indices of ``peer``."""
        taken: list[np.ndarray] = []
        needed = self.batch_size
        while needed:
            order, pos = self._orders[peer], self._positions[peer]
            if pos == len(order):
                order = self._orders[peer] = self._rngs[peer].permutation(self.shards[peer])
                pos = 0
            chunk = order[pos : pos + needed]
            taken.append(chunk)
            self._positions[peer] = pos + len(chunk)
            needed -= len(chunk)
        return np.concatenate(taken)

    def draw_all(self) -> list[np.ndarray]:
        return [self.draw(k) for k in range(self.peers)]

    def state_dict(self) -> dict[str, Any]:
        """Everything that decides the next draws (:mod:`d2ora.engine.state`): per peer its
        generator state and position (JSON) and its current epoch order (``order.<k>``, a tensor)."""
        state: dict[str, Any] = {"positions": list(self._positions), "rngs": [rng.bit_generator.state for rng in self._rngs]}
        state.update({f"order.{k}": torch.from_numpy(order) for k, order in enumerate(self._orders)})
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        positions, rngs = state["positions"], state["rngs"]
        if len(positions) != self.peers or len(rngs) != self.peers:
            raise ValueError(f"sampler state is for {len(positions)} peers, this sampler has {self.peers}")
        orders = [np.array(torch.as_tensor(state[f"order.{k}"]).numpy(), dtype=np.int64) for k in range(self.peers)]
        for k, rng in enumerate(self._rngs):
            rng.bit_generator.state = rngs[k]
        self._orders = orders
        self._positions = [int(p) for p in positions]


def stacked_parameters(peer_model: PeerModel) -> list[nn.Parameter]:
    """Every trainable parameter, each checked to carry the peer dimension first.

    A trainable tensor outside the stacks would be shared by all peers and silently couple them.
    """
    stacked = {id(p) for p in peer_model.stacked_parameters()}
    params = [p for p in peer_model.model.parameters() if p.requires_grad]
    shared = [n for n, p in peer_model.model.named_parameters() if p.requires_grad and id(p) not in stacked]
    if shared:
        raise ValueError(
            f"trainable parameters outside the peer stacks would be shared by every peer: {shared[:5]}; "
            "freeze them or list their module in modules_to_save"
        )
    return params


def make_optimizer(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the stacks (weight decay on matrices only: :func:`d2ora.optim.adamw_groups`),
    fused where torch supports it (one kernel for every peer's update)."""
    groups = adamw_groups(params, weight_decay, stacked=True)
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # dtype / device without a fused kernel
        return torch.optim.AdamW(groups, lr=lr)


@torch.no_grad()
def clip_per_peer_(params: Sequence[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale peer k's gradient (slice k of every stack) so its L2 norm is at most ``max_norm``,
    with ``torch.nn.utils.clip_grad_norm_``'s formula; returns the ``(P,)`` norms before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    squares = torch.stack([g.float().pow(2).flatten(1).sum(1) for g in grads]).sum(0)
    norms = squares.sqrt()
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(factor.to(g.dtype).view(-1, *([1] * (g.dim() - 1))))
    return norms


class StepCorrection(Protocol):
    """What the trainer calls around each AdamW step (``d2ora.engine.drift.LocalCorrection``)."""

    def adjust_gradients(self) -> None:
        """After backward, before clipping (FedProx's proximal gradient is clipped with the rest)."""
        ...

    def adjust_parameters(self, lr: float) -> None:
        """After the optimizer step, which ran at learning rate ``lr``."""
        ...


class LocalTrainer:
    """One local step for every peer at once (or one peer at a time, for checking).

    ``correction``: the drift correction's step hooks (None: plain local steps);
    ``logit_offsets``: ``(peers, num_labels)`` offsets added to the logits in the training loss
    only (``d2ora.engine.label_prior``; None: plain). Its state for checkpoints
    (:meth:`state_dict`) is AdamW's (moments and step counts keyed by stacked parameter name, and
    the groups' settings) and the scheduler's.
    """

    def __init__(
        self,
        peer_model: PeerModel,
        task: Task,
        collate: Collate,
        *,
        lr: float,
        total_steps: int,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.0,
        max_grad_norm: float | None = 1.0,
        group_size: int | None = None,
        base_dropout: bool = False,
        device: torch.device | str = "cpu",
        correction: StepCorrection | None = None,
        logit_offsets: torch.Tensor | None = None,
        grad_accum: int = 1,
        gradient_checkpointing: bool = False,
    ) -> None:
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be at least 1, got {grad_accum}")
        if logit_offsets is not None and logit_offsets.shape[0] != peer_model.peers:
            raise ValueError(f"logit offsets for {logit_offsets.shape[0]} peers, the model holds {peer_model.peers}")
        self.peer_model = peer_model
        self.task = task
        self.collate = collate
        self.params = stacked_parameters(peer_model)
        names = {id(p): name for name, p in peer_model.model.named_parameters()}
        #: Stacked parameter -> its name in the model: the key of its optimizer state in checkpoints
        #: (a name survives a change in parameter order, an index would silently pair wrong tensors).
        self.param_names = {id(p): names[id(p)] for p in self.params}
        self.optimizer = make_optimizer(self.params, lr, weight_decay)
        self.scheduler = linear_schedule(self.optimizer, total_steps, warmup_ratio)
        self.max_grad_norm = max_grad_norm
        self.group_size = group_size or peer_model.peers
        if self.group_size < 1:
            raise ValueError(f"group_size must be at least 1, got {group_size}")
        self.device = torch.device(device)
        self.base_dropout = base_dropout
        self.correction = correction
        self.logit_offsets = logit_offsets
        self.grad_accum = grad_accum
        if gradient_checkpointing:
            enable_checkpointing(peer_model.model)

    def _train_mode(self) -> None:
        """Adapters train; the frozen base runs in eval mode unless ``base_dropout``.

        The base's dropout regularises weights that never change here, and on a CPU drawing its
        masks (attention probabilities above all) costs about a third of a MiniLM step.
        """
        model = self.peer_model.model
        model.train(self.base_dropout)
        for module in (*self.peer_model.layers.values(), *self.peer_model.heads.values()):
            module.train()

    def _groups(self, sequential: bool) -> list[slice]:
        size = 1 if sequential else self.group_size
        peers = self.peer_model.peers
        return [slice(start, min(start + size, peers)) for start in range(0, peers, size)]

    def _micro_slices(self, examples: int) -> list[slice]:
        """The ``grad_accum`` near-equal parts of each peer's ``examples`` (one part: all of them)."""
        if examples < self.grad_accum:
            raise ValueError(f"grad_accum {self.grad_accum} needs at least that many examples per peer per step, got {examples}")
        return micro_batches(examples, self.grad_accum)

    def _peer_losses(self, batch: Batch, group: slice) -> torch.Tensor:
        model = self.peer_model.model
        # Forward only under autocast (a half-precision base; a null context for fp32): the
        # backward runs outside it, in the dtypes the forward chose, as torch recommends.
        with base_autocast(model, self.device):
            if self.logit_offsets is None:
                return self.task.peer_losses(model, batch, group.stop - group.start)
            return self.task.peer_losses(model, batch, group.stop - group.start,
                                         logit_offset=self.logit_offsets[group].to(self.device))

    def step(self, features: Sequence[list[dict[str, Any]]], sequential: bool = False) -> torch.Tensor:
        """One AdamW step of every peer on its own examples ``features[k]`` (equal counts);
        returns the ``(P,)`` losses before the step."""
        peers = self.peer_model.peers
        if len(features) != peers:
            raise ValueError(f"got batches for {len(features)} peers, the model holds {peers}")
        sizes = {len(f) for f in features}
        if len(sizes) != 1 or 0 in sizes:
            # Stacked layers split rows evenly by peer: unequal counts would hand rows to the wrong peer.
            raise ValueError(f"every peer needs the same positive number of examples per step, got {[len(f) for f in features]}")
        self._train_mode()
        self.optimizer.zero_grad(set_to_none=True)
        losses = torch.empty(peers)
        parts = self._micro_slices(sizes.pop())
        for group in self._groups(sequential):
            batches = [
                {key: value.to(self.device) for key, value in self.collate(
                    [example for k in range(group.start, group.stop) for example in features[k][part]]).items()}
                for part in parts
            ]
            # Backward inside serving(group): gradient checkpointing replays the forward there.
            with self.peer_model.serving(group):
                if len(batches) == 1:
                    peer_losses = self._peer_losses(batches[0], group)
                    peer_losses.sum().backward()
                    losses[group] = peer_losses.detach().float().cpu()
                    continue
                active = group.stop - group.start
                units = torch.stack([self.task.peer_loss_units(batch, active) for batch in batches])  # (G, active)
                weights = micro_batch_weights(units)  # the micro-batch's share of each peer's mean
                total = torch.zeros(active)
                for batch, weight in zip(batches, weights):
                    peer_losses = self._peer_losses(batch, group) * weight.to(self.device, torch.float32)
                    peer_losses.sum().backward()
                    total += peer_losses.detach().float().cpu()
                losses[group] = total
        if self.correction is not None:
            self.correction.adjust_gradients()  # FedProx's proximal gradient, clipped with the rest
        if self.max_grad_norm is not None:
            clip_per_peer_(self.params, self.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]  # this step's rate (the scheduler moves it next)
        self.optimizer.step()
        self.scheduler.step()
        if self.correction is not None:
            self.correction.adjust_parameters(lr)
        return losses

    def skip_steps(self, steps: int) -> None:
        """Move the learning-rate schedule ``steps`` steps on without training: a peer that rejoins
        after missing rounds follows the run's schedule, not its own. (LambdaLR's ``step`` would
        warn without an optimizer step; its counter and each group's rate are set as it would.)"""
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        scheduler = self.scheduler
        epoch = scheduler.last_epoch + steps
        for group, base, factor in zip(self.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
            group["lr"] = base * factor(epoch)
        # The scheduler's own state_dict carries its counter and what get_last_lr() reports.
        state = scheduler.state_dict()
        state["last_epoch"] = epoch
        state["_last_lr"] = [group["lr"] for group in self.optimizer.param_groups]
        scheduler.load_state_dict(state)

    def reset_factor_moments(self) -> None:
        """Forget AdamW's state for every A and B (moments and step count).

        After a mixer re-expresses the factors in a new basis (DeCAF's SVD split) the old
        moments describe other coordinates. Dropping the step count too
        matters: zeroed moments with a large step count skip Adam's bias correction and make the
        next update about 3x too large. Magnitudes and heads keep their coordinates and state.
        """
        for layer in self.peer_model.layers.values():
            for param in (layer.lora_A, layer.lora_B):
                self.optimizer.state.pop(param, None)

    # ------------------------------------------------------------------------------ checkpoints
    def _group_names(self) -> list[list[str]]:
        return [[self.param_names[id(p)] for p in group["params"]] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """AdamW's state by stacked parameter name (``optimizer.<name>.<exp_avg|exp_avg_sq|step>``,
        tensors; a parameter whose moments were reset has none), the parameter groups' settings
        with their members' names (``optimizer.param_groups``) and the scheduler's counters
        (``scheduler``), both JSON."""
        full = self.optimizer.state_dict()
        names = [name for group in self._group_names() for name in group]  # torch's state index order
        state: dict[str, Any] = {
            "optimizer.param_groups": [
                {**{k: v for k, v in group.items() if k != "params"}, "params": members}
                for group, members in zip(full["param_groups"], self._group_names())
            ],
        }
        for index, entries in full["state"].items():
            for key, value in entries.items():
                state[f"optimizer.{names[index]}.{key}"] = value
        scheduler = self.scheduler.state_dict()
        # The schedule's function is rebuilt from the config by the constructor; LambdaLR lists it
        # only as a placeholder (or a callable object's fields), which is not state.
        scheduler.pop("lr_lambdas", None)
        state["scheduler"] = scheduler
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        current = self._group_names()
        saved_groups = state["optimizer.param_groups"]
        if [g["params"] for g in saved_groups] != current:
            raise ValueError("optimizer state is for other parameters (model, targets or modules_to_save differ)")
        index = {name: i for i, name in enumerate(n for group in current for n in group)}
        entries: dict[int, dict[str, Any]] = {}
        for key, value in state.items():
            if key == "optimizer.param_groups" or not key.startswith("optimizer."):
                continue
            name, entry = key.removeprefix("optimizer.").rsplit(".", 1)
            if name not in index:
                raise ValueError(f"optimizer state names parameter {name!r}, which this model does not train")
            # Copied: torch's loader keeps a tensor that already has the right dtype and device.
            entries.setdefault(index[name], {})[entry] = value.clone() if torch.is_tensor(value) else value
        groups = []
        for live, saved in zip(self.optimizer.param_groups, saved_groups):
            # JSON made tuples (AdamW's betas) lists: give each setting back its type.
            group = {k: tuple(v) if isinstance(live.get(k), tuple) else v for k, v in saved.items()}
            group["params"] = [index[n] for n in saved["params"]]
            groups.append(group)
        # torch puts each step count where the optimizer keeps it: on the parameter's device for
        # fused / capturable AdamW, on the CPU otherwise.
        self.optimizer.load_state_dict({"state": entries, "param_groups": groups})
        self.scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(self.scheduler.lr_lambdas)})
