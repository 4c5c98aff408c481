"""``d2ora simulate``: P peers fine-tune one shared frozen model with DoRA and gossip their adapters.

One process hosts all P peers (:mod:`d2ora.recipes.session`) and runs the same rounds loop as
``d2ora peer`` under torchrun (:mod:`d2ora.engine.loop`); adapters travel through an in-memory
exchange. The report folder holds::

    config.yaml              the resolved config (``--config`` on it repeats the run)
    metrics.jsonl / .csv     one record per round (round 0 = before training)
    summary.json, report.md  the results table, setup, per-peer table; plots/*.png
    tensorboard/             event files (``tensorboard --logdir runs/``)
    checkpoints/rank-0/      the newest checkpoints (``--resume`` continues from them)
    adapters/peer-<k>/       every peer's final adapter, PEFT format
    consensus/adapter/       the consensus adapter (the mixer's uniform average of all peers)
    consensus/merged/        the consensus adapter merged into a dense model (loads without d2ora)

``mode: centralized`` trains one peer on the pooled shards with P times the batch for the same
number of steps: the same samples seen in all, the upper bound of every comparison.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from d2ora import atomic
from d2ora.config_io import to_yaml
from d2ora.data.partition import format_label_table, label_counts
from d2ora.engine.checkpoint import CheckpointError, Checkpointer, config_differences, rank_dir
from d2ora.engine.exchange import InMemoryExchange, Routes
from d2ora.engine.loop import LocalCollector, LoopState, RoundLoop
from d2ora.engine.metrics_log import MetricsLog
from d2ora.engine.monitor import ConsensusMonitor
from d2ora.engine.round import DivergedError
from d2ora.engine.tensorboard_log import TensorBoardLog
from d2ora.recipes.console_view import ConsoleView
from d2ora.recipes.session import (
    Session,
    build_network,
    open_session,
    remove_stale_outputs,
    save_consensus,
    save_peer_adapters,
    wire_dtype,
)
from d2ora.recipes.simulate_config import SimulateConfig
from d2ora.runtime_support import resolve_device, seed_everything

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"

__all__ = ["CONFIG_FILE", "SUMMARY_FILE", "DivergedError", "describe_setup", "run_summary", "simulate"]


def describe_setup(session: Session, console: Console) -> None:
    """The lines printed before training: model, graph, label table, budget."""
    config, data = session.config, session.data
    console.print(f"[bold]{config.model_name}[/bold] ({config.task}): {session.attach_report.summary()}")
    console.print(f"topology {session.network.description}")
    if data.labels is not None:
        counts = label_counts(data.labels, data.train_shards, data.n_classes)
        console.print(format_label_table(counts, data.class_names, title=f"training examples per peer ({config.partition_label()})"))
    console.print(
        f"{session.peers} peer(s), {config.run_name}, {config.rounds} rounds x {config.local_steps} local steps, "
        f"batch {config.peer_batch_size} per peer, {len(data.test)} test examples, on {session.device}"
    )


def run_summary(session: Session, rows: list[dict[str, Any]], runtime_s: float, saved: dict[str, Any],
                **extra: Any) -> dict[str, Any]:
    """What summary.json holds (the report and ``d2ora compare`` read it)."""
    config, data = session.config, session.data
    message_bytes = session.host.layout.numel * (2 if config.wire_dtype in ("bf16", "fp16") else session.host.layout.dtype.itemsize)
    return {
        "name": config.run_name, "mixer": config.run_name, "method": config.method, "r": config.r, "model": config.model_name,
        "task": config.task, "metric": data.task.metric, "higher_is_better": data.task.higher_is_better, "peers": session.peers,
        "topology": session.network.description, "spectral_gap": session.network.spectral_gap,
        "partition": config.partition_label(), "rounds": config.rounds, "local_steps": config.local_steps,
        "mixing_steps": session.network.mixing_steps, "batch_size": config.peer_batch_size, "label_names": data.class_names,
        "label_counts": label_counts(data.labels, data.train_shards, data.n_classes).tolist() if data.labels is not None else None,
        "final": rows[-1], "runtime_s": runtime_s, **saved,
        "trainable_params_per_peer": session.attach_report.trainable_params, "message_bytes": message_bytes,
        "wire_dtype": config.wire_dtype, **extra,
    }


def check_resumable(config: SimulateConfig, output_dir: Path, rank: int = 0) -> None:
    """Before anything loads: a resume needs checkpoints of this rank, written with the same
    result-relevant config (checked again, with the tensors, when the checkpoint loads)."""
    directory = rank_dir(output_dir, rank)
    newest = sorted(directory.glob("round-*/state.json")) if directory.is_dir() else []
    if not newest:
        raise CheckpointError(f"nothing to resume in {output_dir}: no checkpoints under {directory}")
    try:
        saved = json.loads(newest[-1].read_text(encoding="utf-8")).get("config") or {}
    except (OSError, ValueError, AttributeError):
        return  # unreadable: the loader falls back to an older checkpoint or says what is wrong
    differing = config_differences(saved, config.result_config())
    if differing:
        raise CheckpointError(
            f"cannot resume {output_dir}: the config differs in {', '.join(differing)} "
            "(only keys that cannot change results, such as eval_batch_size, may change)"
        )


def simulate(config: SimulateConfig, console: Console | None = None, resume: bool = False) -> dict[str, Any]:
    """Run one configured simulation (or resume it from its newest checkpoint); returns summary.json's content."""
    from d2ora.report import results_table, write_run_report

    console = console or Console()
    started = time.perf_counter()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    output_dir = atomic.ensure_writable_dir(config.output_dir)
    # Validate the graph before any data or model loads: a bad topology fails in a second.
    build_network(config, [1] * config.peers)
    if resume:
        check_resumable(config, output_dir)

    session = open_session(config, device, lambda peers: range(peers))
    describe_setup(session, console)
    host, network = session.host, session.network
    metric = session.data.task.metric
    checkpointer = Checkpointer(rank_dir(output_dir, 0), host, config.result_config(), every=config.checkpoint_every,
                                keep=config.keep_checkpoints, warn=console.print)
    state, rows = LoopState(), []
    if resume:
        latest = checkpointer.latest_valid()
        if latest is None:
            raise CheckpointError(f"no valid checkpoint to resume in {checkpointer.directory}")
        restored = checkpointer.restore(latest)
        state, rows = restored.state, [r for r in restored.rows if r["round"] <= latest]
        console.print(f"resuming after round {latest} from {restored.path}")
    else:
        shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)  # an earlier run's must not be resumed into this one
    atomic.write_text(output_dir / CONFIG_FILE, to_yaml(config))

    log = MetricsLog(output_dir, metric, rows)
    listeners: list[Any] = [log]
    board = TensorBoardLog(output_dir, metric, purge_after=state.round if resume else None) if config.tensorboard else None
    if board is not None:
        listeners.append(board)
    view = ConsoleView(console, metric, config.rounds, config.local_steps, start_round=state.round)
    listeners.append(view)

    def checkpoint(loop_state: LoopState) -> None:
        if checkpointer.due(loop_state.round, config.rounds):
            checkpointer.save(loop_state, log.rows)

    loop = RoundLoop(
        host, InMemoryExchange(Routes(network.weights), host.peer_ids, wire_dtype(config)), LocalCollector(),
        network.plan(config), rounds=config.rounds, eval_every=config.eval_every, eval_peers=config.eval_peers,
        test_batches=session.test_batches, val_batches=session.val_batches,
        monitor=ConsensusMonitor(host, network.mixer, session.test_batches), peers=session.peers,
        listeners=listeners, checkpoint=checkpoint, on_step=view.on_step,
    )
    try:
        with view:
            state = loop.run(state)
    finally:
        if board is not None:
            board.close()

    remove_stale_outputs(config, output_dir, session.peers)
    saved: dict[str, Any] = {"adapters": save_peer_adapters(session, output_dir), **save_consensus(session, output_dir, state.consensus)}
    summary = run_summary(session, log.rows, time.perf_counter() - started, saved)
    atomic.write_json(output_dir / SUMMARY_FILE, summary)
    report_path = write_run_report(output_dir, summary, log.rows)
    console.print(results_table(summary, log.rows))
    console.print(f"report: {report_path} ({summary['runtime_s']:.0f} s)")
    return summary
