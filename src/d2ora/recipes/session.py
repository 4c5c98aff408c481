"""What one process of a run sets up, the same for ``d2ora simulate`` and ``d2ora peer``: the data
and its seeded partition, the model with its stacked adapters for the peers this process hosts,
the network (mixer, mixing weights, gossip steps) and the :class:`~d2ora.engine.host.PeerHost`.

Every process loads the same data and derives the same partition from the seed, then keeps the
shards of its own block of peers; the adapters start equal everywhere (seeded init).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from d2ora import topology as topo
from d2ora.config_io import ConfigError
from d2ora.data.partition import PartitionError, partition, split_local
from d2ora.data.sft import load_sft_source
from d2ora.data.sft_task import SFT, SFTTask
from d2ora.data.sources import DataSourceError, load_source, split_indices, subsample
from d2ora.data.tasks import CLASS_LABELS, Batch, Task, make_task
from d2ora.dora.attach import AttachReport, attach
from d2ora.dora.files import merge_and_save, save_adapter
from d2ora.engine.exchange import WIRE_DTYPES
from d2ora.engine.host import PeerHost
from d2ora.engine.local_steps import LocalTrainer
from d2ora.engine.peers import PeerModel
from d2ora.engine.round import RoundPlan, make_plan
from d2ora.engine.drift import LocalCorrection
from d2ora.engine.label_prior import log_prior_offsets
from d2ora.engine.share import SharePolicy
from d2ora.mixers import LocalMixer, Mixer, is_federated, make_mixer
from d2ora.mixers.robust import check_neighbourhood, make_robust
from d2ora.models import LoadedModel, head_modules, keep_masters_fp32, load_model, resolve_base_dtype
from d2ora.recipes.sections import adapter_for
from d2ora.recipes.simulate_config import SimulateConfig
from d2ora.runtime_support import quiet_datasets
from d2ora.trust.attacks import flip_labels

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ data
@dataclass
class PeerData:
    """Tokenised examples and who holds which: shards index into ``train_rows``."""

    task: Task
    train_rows: list[dict[str, Any]]
    train_shards: list[np.ndarray]
    val_shards: list[np.ndarray]
    test: Dataset
    labels: np.ndarray | None
    n_classes: int | None
    class_names: list[str] | None


def _labels_of(tokenised: Dataset) -> tuple[np.ndarray | None, list[str] | None]:
    for column in ("labels", CLASS_LABELS):
        if column in tokenised.column_names:
            feature = tokenised.features[column]
            return np.asarray(tokenised[column], dtype=np.int64), list(getattr(feature, "names", []) or []) or None
    return None, None


def prepare_peer_data(config: SimulateConfig, load_model_for: Callable[[Task], LoadedModel]) -> tuple[PeerData, LoadedModel]:
    """Split, tokenise and partition; returns the data and the loaded model bundle.

    ``load_model_for(task)`` loads the model (its tokenizer is needed to tokenise, and a
    classification head needs the task's label names)."""
    classify = config.model.task == "classification"
    label_column = config.data.label_column if classify or config.data.partition != "iid" else None
    if config.model.task == SFT:  # instruction rows -> chat turns
        raw = load_sft_source(config.data.source, config.data.format, label_column=label_column, split=config.data.split)
    else:
        raw = load_source(config.data.source, text_column=config.data.text_column, label_column=label_column, split=config.data.split)
    stratify = "labels" in raw.column_names
    idx = split_indices(raw, 0.0, config.data.test_fraction, config.run.seed, stratify=stratify)
    pool = subsample(raw.select(idx["train"]), config.data.max_train_samples, config.run.seed, stratify=stratify)
    test = subsample(raw.select(idx["test"]), config.data.max_test_samples, config.run.seed, stratify=stratify)
    task = make_task(config.model.task, pool, train_on_prompt=config.data.train_on_prompt)
    loaded = load_model_for(task)
    pool_tok = task.tokenize(pool, loaded.tokenizer, config.data.max_length)
    test_tok = task.tokenize(test, loaded.tokenizer, config.data.max_length)
    if isinstance(task, SFTTask) and task.dropped_line():
        log.warning(task.dropped_line())  # once per process, for both splits
    if len(pool_tok) == 0 or len(test_tok) == 0:
        raise DataSourceError("the data leaves no training or no test examples after splitting and tokenising")
    labels, class_names = _labels_of(pool_tok)
    if labels is None:
        if config.data.partition != "iid":
            raise PartitionError(f"partition '{config.data.partition}' needs class labels and the data has none; use partition=iid")
        labels = np.zeros(len(pool_tok), dtype=np.int64)
    shards = partition(labels, config.network.peers, config.data.partition, config.run.seed, **config.data.partition_params())
    split = [split_local(shard, config.data.local_val_fraction, config.run.seed + k) for k, shard in enumerate(shards)]
    train_shards = [s[0] for s in split]
    val_shards = [s[1] for s in split]
    if config.centralized:  # one peer holding everybody's data
        train_shards = [np.sort(np.concatenate(train_shards))]
        val_shards = [np.sort(np.concatenate(val_shards))]
    n_classes = len(class_names) if class_names else (int(labels.max()) + 1 if labels.size else None)
    train_rows = pool_tok.to_list()
    if config.trust.attack == "label_flip":
        if not class_names:
            raise PartitionError("attack label_flip needs class labels (task classification)")
        train_rows, train_shards, labels = poison_labels(train_rows, train_shards, labels, config.trust.byzantine, len(class_names))
    data = PeerData(
        task=task, train_rows=train_rows, train_shards=train_shards, val_shards=val_shards,
        test=test_tok, labels=labels if class_names else None, n_classes=n_classes, class_names=class_names,
    )
    return data, loaded


def poison_labels(rows: list[dict[str, Any]], shards: list[np.ndarray], labels: np.ndarray, byzantine: list[int],
                  classes: int) -> tuple[list[dict[str, Any]], list[np.ndarray], np.ndarray]:
    """The label-flip attack: each Byzantine peer trains on its own copies of its examples with
    labels y -> C - 1 - y (copies, so the honest peers' rows and the partition stay as they are).
    ``labels`` (one per row) gains the copies' flipped labels, so label tables show what each peer
    trains on."""
    rows = list(rows)
    shards = list(shards)
    extra: list[int] = []
    for peer in byzantine:
        start = len(rows)
        shard = shards[peer]
        flipped = flip_labels([rows[i]["labels"] for i in shard], classes)
        rows.extend({**rows[i], "labels": y} for i, y in zip(shard, flipped))
        extra.extend(int(y) for y in flipped)
        shards[peer] = np.arange(start, start + len(shard), dtype=np.int64)
    return rows, shards, np.concatenate([labels, np.asarray(extra, dtype=labels.dtype)])


# ------------------------------------------------------------------------------------- the graph
@dataclass
class Network:
    """The mixer, the mixing weights (row i: peer i's), gossip steps per round, and a description."""

    mixer: Mixer
    weights: torch.Tensor  # (P, P) float32
    mixing_steps: int  # 0: nothing is sent
    description: str
    spectral_gap: float


def build_network(config: SimulateConfig, shard_sizes: list[int]) -> Network:
    peers = len(shard_sizes)
    if config.centralized:
        return Network(LocalMixer(), torch.ones(1, 1), 0, "centralized: 1 peer on the pooled data", 1.0)
    if is_federated(config.network.mixer):
        # The server is a coordinator outside the P data holders; FedAvg weighs peers by data size.
        # One mix is exact (repeating it would only resend the average).
        weights = torch.as_tensor(topo.fedavg_weights(shard_sizes), dtype=torch.float32)
        line = (f"{config.network.mixer}: every peer receives all {peers} adapters and takes the server's average "
                "(weighted by shard size; no server process)")
        return Network(robust_variant(config, make_mixer(config.network.mixer), weights), weights, 1, line, 1.0)
    graph = topo.build_topology(config.network.topology, peers, **config.network.topology_params)
    w = topo.mixing_matrix(graph, config.network.mixing)
    summary = topo.summarize(graph, w)
    line = f"{summary}, {config.network.mixing} weights".removeprefix("topology ")
    mixer = make_mixer(config.network.mixer)
    if isinstance(mixer, LocalMixer):  # no communication: each peer's neighbourhood is itself
        if config.trust.robust != "none":
            raise ValueError("mixer local sends nothing: there is no neighbourhood to make robust (set robust: none)")
        return Network(mixer, torch.eye(peers), 0, line + " (unused: local training)", summary.spectral_gap)
    weights = torch.as_tensor(w, dtype=torch.float32)
    return Network(robust_variant(config, mixer, weights), weights, config.network.mixing_steps, line, summary.spectral_gap)


def robust_variant(config: SimulateConfig, mixer: Mixer, weights: torch.Tensor) -> Mixer:
    """``mixer`` behind the configured Byzantine-robust rule (itself when ``robust: none``)."""
    options: dict[str, Any] = {"byzantine": config.trust.robust_f}
    if config.trust.robust_tau is not None:
        options["tau"] = config.trust.robust_tau
    try:
        robust = make_robust(mixer, config.trust.robust, **options)
        if robust is not mixer:  # every full neighbourhood must support f: fail now, not after round 1's training
            for k in sorted({int(n) for n in (weights != 0).sum(dim=1).tolist()}):
                check_neighbourhood(config.trust.robust, k, config.trust.robust_f)
    except ValueError as exc:
        raise ConfigError(f"robust: {exc}") from None
    return robust


def wire_dtype(config: SimulateConfig) -> torch.dtype | None:
    return WIRE_DTYPES[config.network.wire_dtype]


# ---------------------------------------------------------------------------------- the session
def collated(rows: list[dict[str, Any]], collate: Any, size: int) -> list[Batch]:
    return [collate(rows[i : i + size]) for i in range(0, len(rows), size)]


@dataclass
class Session:
    """One process's part of a run."""

    config: SimulateConfig
    data: PeerData
    loaded: LoadedModel
    attach_report: AttachReport
    network: Network
    host: PeerHost
    device: torch.device
    test_batches: list[Batch]
    val_batches: list[list[Batch]]  # per hosted peer
    share: SharePolicy  # what travels (decided once: messages, the exchange wrapper, the kept parts)
    plan: RoundPlan  # what every round does

    @property
    def peers(self) -> int:
        return len(self.data.train_shards)


def open_session(config: SimulateConfig, device: torch.device, block: Callable[[int], range]) -> Session:
    """Load data and model, attach and stack the adapters of the peers ``block(P)`` this process hosts."""

    def load(task: Task) -> LoadedModel:
        # Loaded straight in the base's dtype: an 8B base is never held in fp32 on the way.
        return load_model(config.model_name, config.model.task, label_names=getattr(task, "label_names", None),
                          seed=config.run.seed, torch_dtype=resolve_base_dtype(config.model.base_dtype, device))

    with quiet_datasets():
        data, loaded = prepare_peer_data(config, load)
    task = data.task
    saved_modules = config.adapter.modules_to_save
    if saved_modules is None:
        saved_modules = head_modules(loaded) if config.model.task == "classification" else []
    report = attach(loaded.model, adapter_for(config.adapter, saved_modules, config.run.seed))
    keep_masters_fp32(loaded.model, report.modules_to_save)  # m, A, B are fp32 already (DoRALinear)
    peers = len(data.train_shards)
    hosted = block(peers)
    peer_model = PeerModel(loaded.model, len(hosted))
    loaded.model.to(device)
    network = build_network(config, [len(s) for s in data.train_shards])
    collate = task.collator(loaded.tokenizer)
    offsets = correction = None
    if config.network.logit_adjust > 0:  # each hosted peer's own label prior, from its own training shard
        offsets = log_prior_offsets([data.labels[data.train_shards[k]] for k in hosted], data.n_classes, config.network.logit_adjust)
    if config.network.drift != "none" or config.network.prox_mu > 0:
        correction = LocalCorrection(peer_model, config.network.drift, beta=config.network.drift_beta, prox_mu=config.network.prox_mu,
                                     factors_replaced=network.mixer.factors_replaced)
    trainer = LocalTrainer(
        peer_model, task, collate, lr=config.optim.lr, total_steps=config.total_steps,
        weight_decay=config.optim.weight_decay, warmup_ratio=config.optim.warmup_ratio, max_grad_norm=config.optim.max_grad_norm,
        group_size=min(config.group_size(device), len(hosted)), base_dropout=config.model.base_dropout, device=device,
        correction=correction, logit_offsets=offsets,
        grad_accum=config.optim.grad_accum, gradient_checkpointing=config.model.gradient_checkpointing,
    )
    host = PeerHost(
        hosted, peer_model, trainer, data.train_rows, [data.train_shards[k] for k in hosted], task, collate, device,
        batch_size=config.peer_batch_size, seed=config.run.seed, align_examples=config.network.dimat_examples,
        align_max_tokens=config.network.dimat_max_tokens,
    )
    test_batches = collated(data.test.to_list(), collate, config.run.eval_batch_size)
    val_batches = [collated([data.train_rows[i] for i in data.val_shards[k]], collate, config.run.eval_batch_size) for k in hosted]
    share = SharePolicy(host.layout, config.network.share)
    plan = make_plan(host, network.mixer, network.weights, local_steps=config.run.local_steps, mixing_steps=network.mixing_steps,
                     share=share, hooks=[correction] if correction is not None else [], sequential=config.run.sequential)
    return Session(config, data, loaded, report, network, host, device, test_batches, val_batches, share, plan)


# ------------------------------------------------------------------------------------- outputs
def remove_stale_outputs(config: SimulateConfig, output_dir: Path, peers: int) -> None:
    """A re-run into the same folder must not leave an earlier run's files looking like this one's."""
    for old in (output_dir / "adapters").glob("peer-*"):
        index = old.name.removeprefix("peer-")
        if old.is_dir() and index.isdigit() and (not config.run.save_adapters or int(index) >= peers):
            shutil.rmtree(old)
    if not config.run.save_merged:
        shutil.rmtree(output_dir / "consensus" / "merged", ignore_errors=True)


def save_peer_adapters(session: Session, output_dir: Path) -> None:
    """Every hosted peer's adapter in PEFT format (``adapters/peer-<k>``, k global)."""
    if not session.config.run.save_adapters:
        return
    host, base, task = session.host, session.loaded.source.portable_name, session.data.task
    for k in host.peer_ids:
        with host.peer_model.peer_view(host.local(k)) as view:
            save_adapter(view, output_dir / "adapters" / f"peer-{k}", base_model_name_or_path=base, task_type=task.peft_task_type)


def save_consensus(session: Session, output_dir: Path, consensus: torch.Tensor | None) -> dict[str, str | None]:
    """The consensus adapter (the one last scored) and its merged dense model, from peer 0's host."""
    host, base, task = session.host, session.loaded.source.portable_name, session.data.task
    saved: dict[str, str | None] = {"consensus_adapter": None, "merged_model": None}
    slot = host.local(0)
    holding = host.peer_model.holding(slot, consensus) if consensus is not None else contextlib.nullcontext()
    with holding, host.peer_model.peer_view(slot) as view:
        save_adapter(view, output_dir / "consensus" / "adapter", base_model_name_or_path=base, task_type=task.peft_task_type)
        saved["consensus_adapter"] = "consensus/adapter"
        if session.config.run.save_merged:
            merge_and_save(view, output_dir / "consensus" / "merged", tokenizer=session.loaded.tokenizer)
            saved["merged_model"] = "consensus/merged"
    return saved
