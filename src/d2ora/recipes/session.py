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
from datasets import Dataset, concatenate_datasets

from d2ora import topology as topo
from d2ora.config_io import ConfigError
from d2ora.data.partition import PartitionError, partition, split_local
from d2ora.data.sft import MESSAGES, ROW_ID, answers_are_labels, encode, final_answer, load_sft_source, with_answer
from d2ora.data.sft_task import SFT, SFTTask
from d2ora.data.sources import LABELS, DataSourceError, align_class_labels, load_source, quotas, split_indices, subsample
from d2ora.data.tasks import CLASS_LABELS, Batch, Task, make_task
from d2ora.dora.attach import AttachReport, attach
from d2ora.dora.files import merge_and_save, save_adapter
from d2ora.engine.exchange import WIRE_DTYPES
from d2ora.engine.host import PeerHost
from d2ora.engine.local_steps import LocalTrainer
from d2ora.engine.peers import PeerModel
from d2ora.engine.state import Stateful
from d2ora.engine.round import RoundPlan, make_plan
from d2ora.engine.drift import LocalCorrection
from d2ora.engine.outer_optimizer import OuterOptimizer
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


def _split_by_class(config: SimulateConfig) -> bool:
    """Whether classes shape the data: classification, or a class-skewed partition (a domain /
    category column of sft data counts as the class). Only then are splits and caps stratified."""
    return config.model.task == "classification" or config.data.partition in ("dirichlet", "k_labels")


def _label_column(config: SimulateConfig) -> str | None:
    """The column read as class labels: when classes shape the data or the label-flip attack needs
    them (plain text and chat data need none otherwise)."""
    return config.data.label_column if _split_by_class(config) or config.trust.attack == "label_flip" else None


def _load_raw(config: SimulateConfig, source: Any, label_column: str | None) -> Dataset:
    if config.model.task == SFT:  # instruction rows -> chat turns
        return load_sft_source(source, config.data.format, label_column=label_column, split=config.data.split)
    return load_source(source, text_column=config.data.text_column, label_column=label_column, split=config.data.split)


def _capped(parts: list[Dataset], cap: int | None, seed: int, stratify: bool) -> list[Dataset]:
    """At most ``cap`` examples over the union of ``parts`` (one per source), each part keeping its
    share (largest remainder) and, within it, its class proportions. One part: plain ``subsample``."""
    if cap is None or cap >= sum(len(p) for p in parts):
        return parts
    out = []
    for part, quota in zip(parts, quotas([len(p) for p in parts], cap)):
        out.append(subsample(part, int(quota), seed, stratify=stratify) if quota > 0 else part.select([]))
    return out


def _concat(parts: list[Dataset]) -> Dataset:
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def prepare_peer_data(config: SimulateConfig, load_model_for: Callable[[Task], LoadedModel]) -> tuple[PeerData, LoadedModel]:
    """Split, tokenise and partition; returns the data and the loaded model bundle.

    ``load_model_for(task)`` loads the model (its tokenizer is needed to tokenise, and a
    classification head needs the task's label names).

    With ``data.partition: by_source`` each of ``data.peer_sources`` is read and split on its own:
    its ``test_fraction`` (stratified by class when it has labels) goes to the test set, which is the
    union of every source's test part; the rest is peer k's training pool, of which
    ``local_val_fraction`` is its validation split as in every partition. The caps
    (``max_train_samples``, ``max_test_samples``) apply to the unions, each source keeping its share.
    Class names are the union over the sources, so every peer numbers classes alike."""
    by_source = config.data.partition == "by_source"
    sources = list(config.data.peer_sources or []) if by_source else [config.data.source]
    seed = config.run.seed
    raws = align_class_labels([_load_raw(config, source, _label_column(config)) for source in sources])
    # Labels read for the label-flip attack alone do not stratify: the honest peers' data stay
    # exactly those of the same run without the attack.
    stratify = _split_by_class(config) and LABELS in raws[0].column_names
    held_out = []
    for k, raw in enumerate(raws):  # seed + k: equal-sized sources do not share the same cut
        idx = split_indices(raw, 0.0, config.data.test_fraction, seed + k, stratify=stratify)
        held_out.append((raw.select(idx["train"]), raw.select(idx["test"])))
    pools = _capped([train for train, _ in held_out], config.data.max_train_samples, seed, stratify)
    tests = _capped([test for _, test in held_out], config.data.max_test_samples, seed, stratify)
    flip_answers = config.trust.attack == "label_flip" and config.model.task == SFT
    conversations: list[Any] = []
    if flip_answers:  # the attack rewrites answers: keep where each tokenised row's conversation is
        offsets = np.cumsum([0, *(len(p) for p in pools)])
        pools = [p.add_column(ROW_ID, list(range(offsets[k], offsets[k + 1]))) for k, p in enumerate(pools)]
        conversations = [turns for p in pools for turns in p[MESSAGES]]
    task = make_task(config.model.task, _concat(pools), train_on_prompt=config.data.train_on_prompt)
    loaded = load_model_for(task)
    # Each source tokenised on its own, so every tokenised row still knows its source (tokenising
    # drops examples: cut-off answers, one-token texts).
    pool_parts = [task.tokenize(p, loaded.tokenizer, config.data.max_length) for p in pools]
    pool_tok = _concat(pool_parts)
    test_tok = task.tokenize(_concat(tests), loaded.tokenizer, config.data.max_length)
    if isinstance(task, SFTTask) and task.dropped_line():
        log.warning(task.dropped_line())  # once per process, for both splits
    if len(pool_tok) == 0 or len(test_tok) == 0:
        raise DataSourceError("the data leaves no training or no test examples after splitting and tokenising")
    labels, class_names = _labels_of(pool_tok)
    if by_source:
        origin = np.concatenate([np.full(len(part), k, dtype=np.int64) for k, part in enumerate(pool_parts)])
        shards = partition(origin, config.network.peers, "by_source", seed)
        labels = labels if labels is not None else np.zeros(len(pool_tok), dtype=np.int64)
    else:
        if labels is None:
            if config.data.partition != "iid":
                raise PartitionError(f"partition '{config.data.partition}' needs class labels and the data has none; use partition=iid")
            labels = np.zeros(len(pool_tok), dtype=np.int64)
        shards = partition(labels, config.network.peers, config.data.partition, seed, **config.data.partition_params())
    split = [split_local(shard, config.data.local_val_fraction, seed + k) for k, shard in enumerate(shards)]
    train_shards = [s[0] for s in split]
    val_shards = [s[1] for s in split]
    if config.centralized:  # one peer holding everybody's data
        train_shards = [np.sort(np.concatenate(train_shards))]
        val_shards = [np.sort(np.concatenate(val_shards))]
    n_classes = len(class_names) if class_names else (int(labels.max()) + 1 if labels.size else None)
    train_rows = pool_tok.to_list()
    if config.trust.attack == "label_flip":
        if not class_names or config.model.task not in ("classification", SFT):
            raise PartitionError("attack label_flip needs class labels to flip: model.task classification, or sft data whose "
                                 "answers are class words (data.label_column names them, e.g. bbc_news_sections)")
        if flip_answers:
            train_rows, train_shards, labels = poison_answers(train_rows, train_shards, labels, config.trust.byzantine, class_names,
                                                              conversations, loaded.tokenizer, config.data.max_length)
        else:
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


def poison_answers(rows: list[dict[str, Any]], shards: list[np.ndarray], labels: np.ndarray, byzantine: list[int],
                   names: list[str], conversations: list[Any], tokenizer: Any,
                   max_length: int) -> tuple[list[dict[str, Any]], list[np.ndarray], np.ndarray]:
    """The label-flip attack on instruction data whose answers are class words: as
    :func:`poison_labels`, but each copy's conversation has its final answer replaced by the flipped
    class's word (y -> C - 1 - y) and is tokenised afresh, so the peer learns the wrong word.

    Every training row's answer must be its class's name (otherwise there is no class word to
    replace: one error naming the first row that is not). A copy whose new answer ``max_length``
    cuts off entirely is left out (and counted in a warning), as tokenising drops such examples."""
    bad = answers_are_labels([conversations[row[ROW_ID]] for row in rows], [row[CLASS_LABELS] for row in rows], names)
    if bad is not None:
        answer = final_answer(conversations[rows[bad][ROW_ID]])
        raise PartitionError(
            f"attack label_flip on sft data replaces each answer by another class's word, so answers must be the class "
            f"names; training example {bad}'s answer {answer[:40]!r} is not its class {names[rows[bad][CLASS_LABELS]]!r}")
    rows = list(rows)
    shards = list(shards)
    extra: list[int] = []
    dropped = 0
    for peer in byzantine:
        start = len(rows)
        shard = shards[peer]
        for i, y in zip(shard, flip_labels([rows[i][CLASS_LABELS] for i in shard], len(names))):
            encoded = encode(tokenizer, with_answer(conversations[rows[i][ROW_ID]], names[y]), max_length)
            if encoded is None:
                dropped += 1
                continue
            rows.append({**rows[i], **encoded, CLASS_LABELS: y})
            extra.append(y)
        shards[peer] = np.arange(start, len(rows), dtype=np.int64)
    if dropped:
        log.warning(f"label_flip: {dropped} flipped example(s) left out: max_length cut off their whole new answer")
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
    outer: OuterOptimizer | None = None  # network.outer_optimizer's hook (in plan.hooks), checkpointed

    def components(self) -> dict[str, Stateful]:
        """What a checkpoint of this process holds: the host's components and the outer optimizer."""
        parts = self.host.components()
        if self.outer is not None:
            parts["outer"] = self.outer
        return parts

    @property
    def peers(self) -> int:
        return len(self.data.train_shards)


def open_session(config: SimulateConfig, device: torch.device, block: Callable[[int], range]) -> Session:
    """Load data and model, attach and stack the adapters of the peers ``block(P)`` this process hosts."""

    def load(task: Task) -> LoadedModel:
        # Loaded straight in the base's dtype: an 8B base is never held in fp32 on the way.
        return load_model(config.model_name, config.model.task, label_names=getattr(task, "label_names", None),
                          seed=config.run.seed, torch_dtype=resolve_base_dtype(config.model.base_dtype, device),
                          quantize=config.model.quantize, device=device)

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
    if isinstance(data.task, SFTTask):  # the cap on greedy answers per evaluation, in every runtime
        data.task.generate_examples = config.run.generate_examples
    test_batches = collated(data.test.to_list(), collate, config.run.eval_batch_size)
    val_batches = [collated([data.train_rows[i] for i in data.val_shards[k]], collate, config.run.eval_batch_size) for k in hosted]
    share = SharePolicy(host.layout, config.network.share)
    outer = None
    if config.network.outer_optimizer != "none":
        outer = OuterOptimizer(peer_model, lr=config.network.outer_lr, momentum=config.network.outer_momentum,
                               mixer=network.mixer.name, factors_replaced=network.mixer.factors_replaced, shared=share.mask)
    # The outer step first: QGM's momentum then sees the round's whole move, outer step included.
    hooks = [h for h in (outer, correction) if h is not None]
    plan = make_plan(host, network.mixer, network.weights, local_steps=config.run.local_steps, mixing_steps=network.mixing_steps,
                     share=share, hooks=hooks, sequential=config.run.sequential)
    return Session(config, data, loaded, report, network, host, device, test_batches, val_batches, share, plan, outer)


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
