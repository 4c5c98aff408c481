"""``d2ora simulate``: P peers fine-tune one shared frozen model with DoRA and gossip their adapters.

One run, in order: load and split the data (one global test set, the rest dealt to peers by the
partitioner, each peer keeping a local validation split); load the model once and stack P
adapters over it (:class:`~d2ora.engine.peers.PeerModel`); then ``rounds`` times: every peer takes
``local_steps`` AdamW steps on its own shard (all peers in one peer-batched pass), the mixer mixes
neighbours' adapters with the topology's weights, and the round is scored and logged. The report
folder holds::

    config.yaml              the resolved config (``--config`` on it repeats the run)
    metrics.jsonl / .csv     one record per round (round 0 = before training)
    summary.json, report.md  the results table, setup, per-peer table; plots/*.png
    adapters/peer-<k>/       every peer's final adapter, PEFT format
    consensus/adapter/       the consensus adapter (the mixer's uniform average of all peers)
    consensus/merged/        the consensus adapter merged into a dense model (loads without d2ora)

``mixer: centralized`` trains one peer on the pooled shards with P times the batch for the same
number of steps: the same samples seen in all, the upper bound of every comparison.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from d2ora import atomic
from d2ora import topology as topo
from d2ora.config_io import to_yaml
from d2ora.data.partition import (
    PartitionError,
    format_label_table,
    label_counts,
    partition,
    split_local,
)
from d2ora.data.sources import DataSourceError, load_source, split_indices, subsample
from d2ora.data.tasks import CLASS_LABELS, Batch, Task, make_task
from d2ora.dora.attach import attach
from d2ora.dora.files import merge_and_save, save_adapter
from d2ora.engine.consensus import measure
from d2ora.engine.evaluate import (
    applied,
    collect_layer_inputs,
    consensus_output,
    evaluate_each_on_own,
    evaluate_peers,
)
from d2ora.engine.local_steps import LocalTrainer, PeerSampler
from d2ora.engine.metrics_log import MetricsLog
from d2ora.engine.peers import PeerModel
from d2ora.mixers import FedAvgMixer, LocalMixer, Mixer, MixOutput, make_mixer
from d2ora.models import head_modules, load_model
from d2ora.recipes.simulate_config import SimulateConfig
from d2ora.recipes.train import quiet_datasets, resolve_device, seed_everything

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"


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


def prepare_peer_data(config: SimulateConfig, load_model_for: Any) -> tuple[PeerData, Any]:
    """Split, tokenise and partition; returns the data and the loaded model bundle.

    ``load_model_for(task)`` loads the model (its tokenizer is needed to tokenise, and a
    classification head needs the task's label names)."""
    classify = config.task == "classification"
    raw = load_source(
        config.data, text_column=config.text_column,
        label_column=config.label_column if classify or config.partition != "iid" else None,
        split=config.data_split,
    )
    stratify = "labels" in raw.column_names
    idx = split_indices(raw, 0.0, config.test_fraction, config.seed, stratify=stratify)
    pool = subsample(raw.select(idx["train"]), config.max_train_samples, config.seed, stratify=stratify)
    test = subsample(raw.select(idx["test"]), config.max_test_samples, config.seed, stratify=stratify)
    task = make_task(config.task, pool)
    loaded = load_model_for(task)
    pool_tok = task.tokenize(pool, loaded.tokenizer, config.max_length)
    test_tok = task.tokenize(test, loaded.tokenizer, config.max_length)
    if len(pool_tok) == 0 or len(test_tok) == 0:
        raise DataSourceError("the data leaves no training or no test examples after splitting and tokenising")
    labels, class_names = _labels_of(pool_tok)
    if labels is None:
        if config.partition != "iid":
            raise PartitionError(f"partition '{config.partition}' needs class labels and the data has none; use partition=iid")
        labels = np.zeros(len(pool_tok), dtype=np.int64)
    peers = config.peers
    shards = partition(labels, peers, config.partition, config.seed, **config.partition_params())
    split = [split_local(shard, config.local_val_fraction, config.seed + k) for k, shard in enumerate(shards)]
    train_shards = [s[0] for s in split]
    val_shards = [s[1] for s in split]
    if config.centralized:  # one peer holding everybody's data
        train_shards = [np.sort(np.concatenate(train_shards))]
        val_shards = [np.sort(np.concatenate(val_shards))]
    n_classes = len(class_names) if class_names else (int(labels.max()) + 1 if labels.size else None)
    data = PeerData(
        task=task, train_rows=pool_tok.to_list(), train_shards=train_shards, val_shards=val_shards,
        test=test_tok, labels=labels if class_names else None, n_classes=n_classes, class_names=class_names,
    )
    return data, loaded


# ------------------------------------------------------------------------------------- the graph
@dataclass
class Network:
    """The mixer, its weights and a one-line description for the log."""

    mixer: Mixer
    weights: torch.Tensor
    description: str
    spectral_gap: float
    receivers: list[int]  # how many peers receive each peer's adapter per round


def build_network(config: SimulateConfig, shard_sizes: list[int]) -> Network:
    peers = len(shard_sizes)
    if config.centralized:
        return Network(LocalMixer(), torch.ones(1, 1), "centralized: 1 peer on the pooled data", 1.0, [0])
    if config.mixer == "fedavg":
        # The server is a coordinator outside the P data holders; FedAvg weighs peers by data size.
        mixer = FedAvgMixer(peer_weights=shard_sizes)
        weights = mixer.server_weights(peers).float().expand(peers, peers).clone()  # every row: the server's average
        line = f"fedavg: star({peers + 1}), a server without data averages the {peers} peers weighted by shard size"
        return Network(mixer, weights, line, 1.0, [1] * peers)
    graph = topo.build_topology(config.topology, peers, **config.topology_params)
    w = topo.mixing_matrix(graph, config.mixing)
    summary = topo.summarize(graph, w)
    receivers = [int(np.count_nonzero(w[:, i])) - (1 if w[i, i] != 0 else 0) for i in range(peers)]
    mixer = make_mixer(config.mixer)
    if isinstance(mixer, LocalMixer):
        receivers = [0] * peers
    line = f"{summary}, {config.mixing} weights".removeprefix("topology ")
    return Network(mixer, torch.as_tensor(w, dtype=torch.float32), line, summary.spectral_gap, receivers)


# ------------------------------------------------------------------------------------- the run
def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
    )


def _collated(rows: list[dict[str, Any]], collate: Any, size: int) -> list[Batch]:
    return [collate(rows[i : i + size]) for i in range(0, len(rows), size)]


def _adapter_bytes(peer_model: PeerModel) -> int:
    """Bytes of one peer's adapter message: its slice of every stacked tensor (m, B, A, heads)."""
    return sum(p[0].numel() * p.element_size() for p in peer_model.stacked_parameters())


def _mean_metric(results: list[dict[str, float]] | None, metric: str) -> dict[str, float] | None:
    if not results:
        return None
    values = [r[metric] for r in results if r is not None]
    return {metric: float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}


class DivergedError(RuntimeError):
    """A peer's training loss became NaN or infinite; the rounds logged so far stay on disk."""


def _check_finite(losses: torch.Tensor, round_index: int) -> None:
    bad = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()
    if bad:
        raise DivergedError(
            f"peer(s) {bad} diverged in round {round_index} (training loss {losses[bad[0]].item()}); "
            "lower lr or set max_grad_norm; metrics of the finished rounds are in metrics.jsonl"
        )


class Simulation:
    """The rounds loop of one configured run (built by :func:`simulate`)."""

    def __init__(self, config: SimulateConfig, data: PeerData, peer_model: PeerModel, network: Network,
                 collate: Any, device: torch.device, console: Console) -> None:
        self.config, self.data, self.peer_model, self.network = config, data, peer_model, network
        self.collate, self.device, self.console = collate, device, console
        self.task = data.task
        self.sampler = PeerSampler(data.train_shards, config.peer_batch_size, config.seed)
        self.align_sampler = PeerSampler(data.train_shards, config.dimat_examples, config.seed + 1)
        self.trainer = LocalTrainer(
            peer_model, self.task, collate, lr=config.lr, total_steps=config.total_steps,
            weight_decay=config.weight_decay, warmup_ratio=config.warmup_ratio, max_grad_norm=config.max_grad_norm,
            group_size=config.group_size(device), base_dropout=config.base_dropout, device=device,
        )
        self.test_batches = _collated(data.test.to_list(), collate, config.eval_batch_size)
        self.val_batches = [_collated([data.train_rows[i] for i in shard], collate, config.eval_batch_size) for shard in data.val_shards]
        self.message_bytes = _adapter_bytes(peer_model)
        self.samples_seen = 0
        self.bytes_total = 0
        #: The consensus model of the latest evaluation (the last round is always evaluated), kept so
        #: the saved consensus adapter is the one that was scored; None with a single peer.
        self.last_consensus: MixOutput | None = None

    def _layer_inputs(self, salt: int) -> Any:
        """Each peer's layer inputs on a fresh batch of its own data (for DIMAT's matching)."""
        rows = [self.data.train_rows[i] for shard in self.align_sampler.draw_all() for i in shard]
        batch = {k: v.to(self.device) for k, v in self.collate(rows).items()}
        return collect_layer_inputs(self.peer_model, batch, self.config.dimat_max_tokens, seed=self.config.seed + salt)

    def mix(self, round_index: int) -> list[int]:
        """One mixing step; returns the bytes each peer sent."""
        mixer = self.network.mixer
        if isinstance(mixer, LocalMixer):
            return [0] * self.peer_model.peers
        # FedAvg's server average is exact in one step; repeating it would only resend it.
        steps = 1 if isinstance(mixer, FedAvgMixer) else self.config.mixing_steps
        for _ in range(steps):
            inputs = self._layer_inputs(round_index) if mixer.needs_layer_inputs else None
            self.peer_model.apply(mixer.mix(self.peer_model.mix_input(self.network.weights, inputs)))
        if mixer.factors_replaced:
            self.trainer.reset_factor_moments()
        return [steps * n * self.message_bytes for n in self.network.receivers]

    def evaluate(self, round_index: int) -> dict[str, Any]:
        metric = self.task.metric
        pm = self.peer_model
        peer_test = evaluate_peers(pm, self.task, self.test_batches, self.device) if self.config.eval_peers else None
        if pm.peers == 1:
            consensus = peer_test[0] if peer_test else evaluate_peers(pm, self.task, self.test_batches, self.device)[0]
        else:
            self.last_consensus = self.consensus()
            with applied(pm, self.last_consensus):
                consensus = evaluate_peers(pm, self.task, self.test_batches, self.device, peers=[0])[0]
        distances = measure(pm)
        return {
            "peer_test": peer_test,
            "mean_peer_test": _mean_metric(peer_test, metric),
            "consensus_test": consensus,
            "peer_val": evaluate_each_on_own(pm, self.task, self.val_batches, self.device),
            "consensus_distance": {"magnitude": distances.magnitude, "product": distances.product, "merged": distances.merged},
        }

    def consensus(self) -> Any:
        mixer = self.network.mixer
        inputs = self._layer_inputs(salt=-1) if mixer.needs_layer_inputs else None
        return consensus_output(self.peer_model, mixer, inputs)

    def run(self, log: MetricsLog) -> None:
        config = self.config
        started = time.perf_counter()
        row = {"round": 0, "samples_seen": 0, "wall_time_s": 0.0, "train_loss": [None] * self.peer_model.peers,
               "bytes_sent": [0] * self.peer_model.peers, "bytes_sent_total": 0, **self.evaluate(0)}
        log.append(row)
        self.console.print(self._round_line(row))
        with _progress(self.console) as progress:
            bar = progress.add_task("round 1", total=config.total_steps, loss="-")
            for rnd in range(1, config.rounds + 1):
                loss_sum = torch.zeros(self.peer_model.peers)
                for _ in range(config.local_steps):
                    features = [[self.data.train_rows[i] for i in idx] for idx in self.sampler.draw_all()]
                    losses = self.trainer.step(features, sequential=config.sequential)
                    _check_finite(losses, rnd)
                    loss_sum += losses
                    self.samples_seen += sum(len(f) for f in features)
                    progress.update(bar, advance=1, description=f"round {rnd}/{config.rounds}", loss=f"{losses.mean():.4f}")
                sent = self.mix(rnd)
                self.bytes_total += sum(sent)
                row = {"round": rnd, "samples_seen": self.samples_seen, "train_loss": (loss_sum / config.local_steps).tolist(),
                       "bytes_sent": sent, "bytes_sent_total": self.bytes_total}
                if rnd % config.eval_every == 0 or rnd == config.rounds:
                    progress.update(bar, description=f"round {rnd}/{config.rounds}: evaluating")
                    row.update(self.evaluate(rnd))
                row["wall_time_s"] = time.perf_counter() - started
                log.append(row)
                if "consensus_test" in row:
                    progress.console.print(self._round_line(row))

    def _round_line(self, row: dict[str, Any]) -> str:
        metric = self.task.metric
        fmt = (lambda v: f"{100 * v:.1f}%") if metric == "accuracy" else (lambda v: f"{v:.2f}")
        parts = [f"round {row['round']}: consensus {metric} {fmt(row['consensus_test'][metric])}"]
        if row.get("mean_peer_test"):
            mean = row["mean_peer_test"]
            parts.append(f"peers {fmt(mean[metric])} (min {fmt(mean['min'])}, max {fmt(mean['max'])})")
        dist = row["consensus_distance"]
        parts.append(f"consensus dist B·A {dist['product']:.3g}")
        return ", ".join(parts)


# ------------------------------------------------------------------------------------- outputs
def _save_outputs(sim: Simulation, loaded: Any, output_dir: Path) -> dict[str, Any]:
    config, pm, task = sim.config, sim.peer_model, sim.task
    saved: dict[str, Any] = {"adapters": [], "consensus_adapter": None, "merged_model": None}
    base = loaded.source.path
    adapters = output_dir / "adapters"
    # A re-run into the same folder must not leave an earlier run's files looking like this one's.
    for old in adapters.glob("peer-*"):
        index = old.name.removeprefix("peer-")
        if old.is_dir() and index.isdigit() and (not config.save_adapters or int(index) >= pm.peers):
            shutil.rmtree(old)
    if not config.save_merged:
        shutil.rmtree(output_dir / "consensus" / "merged", ignore_errors=True)
    if config.save_adapters:
        for k in range(pm.peers):
            with pm.peer_view(k) as view:
                save_adapter(view, adapters / f"peer-{k}", base_model_name_or_path=base, task_type=task.peft_task_type)
            saved["adapters"].append(f"adapters/peer-{k}")
    consensus = sim.last_consensus
    with applied(pm, consensus) if consensus is not None else contextlib.nullcontext(), pm.peer_view(0) as view:
        save_adapter(view, output_dir / "consensus" / "adapter", base_model_name_or_path=base, task_type=task.peft_task_type)
        saved["consensus_adapter"] = "consensus/adapter"
        if config.save_merged:
            merge_and_save(view, output_dir / "consensus" / "merged", tokenizer=loaded.tokenizer)
            saved["merged_model"] = "consensus/merged"
    return saved


def simulate(config: SimulateConfig, console: Console | None = None) -> dict[str, Any]:
    """Run one configured simulation; returns what summary.json holds."""
    from d2ora.report import results_table, write_run_report

    console = console or Console()
    started = time.perf_counter()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    output_dir = Path(config.output_dir)
    # Validate the graph before any data or model loads: a bad topology fails in a second.
    build_network(config, [1] * config.peers)

    def load(task: Task) -> Any:
        return load_model(config.model_name, config.task, label_names=getattr(task, "label_names", None), seed=config.seed)

    with quiet_datasets():
        data, loaded = prepare_peer_data(config, load)
    task = data.task
    saved_modules = config.modules_to_save
    if saved_modules is None:
        saved_modules = head_modules(loaded) if config.task == "classification" else []
    report = attach(loaded.model, config.dora_config(saved_modules))
    peers = len(data.train_shards)
    peer_model = PeerModel(loaded.model, peers)
    loaded.model.to(device)
    network = build_network(config, [len(s) for s in data.train_shards])

    console.print(f"[bold]{config.model_name}[/bold] ({config.task}): {report.summary()}")
    console.print(f"topology {network.description}")
    if data.labels is not None:
        counts = label_counts(data.labels, data.train_shards, data.n_classes)
        console.print(format_label_table(counts, data.class_names, title=f"training examples per peer ({config.partition_label()})"))
    console.print(
        f"{peers} peer(s), mixer {config.mixer}, {config.rounds} rounds x {config.local_steps} local steps, "
        f"batch {config.peer_batch_size} per peer, {len(data.test)} test examples, on {device}"
    )

    output_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(output_dir / CONFIG_FILE, to_yaml(config))
    sim = Simulation(config, data, peer_model, network, task.collator(loaded.tokenizer), device, console)
    log = MetricsLog(output_dir, task.metric)
    sim.run(log)
    saved = _save_outputs(sim, loaded, output_dir)
    summary = {
        "name": config.mixer, "mixer": config.mixer, "method": config.method, "r": config.r, "model": config.model_name,
        "task": config.task, "metric": task.metric, "higher_is_better": task.higher_is_better, "peers": peers,
        "topology": network.description, "spectral_gap": network.spectral_gap, "partition": config.partition_label(),
        "rounds": config.rounds, "local_steps": config.local_steps,
        "batch_size": config.peer_batch_size,
        "label_names": data.class_names,
        "label_counts": label_counts(data.labels, data.train_shards, data.n_classes).tolist() if data.labels is not None else None,
        "final": log.rows[-1], "runtime_s": time.perf_counter() - started, **saved,
        "trainable_params_per_peer": report.trainable_params, "message_bytes": sim.message_bytes,
    }
    atomic.write_json(output_dir / SUMMARY_FILE, summary)
    report_path = write_run_report(output_dir, summary, log.rows)
    console.print(results_table(summary, log.rows))
    console.print(f"report: {report_path} ({summary['runtime_s']:.0f} s)")
    return summary
