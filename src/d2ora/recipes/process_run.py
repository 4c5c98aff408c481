"""One process's run after set-up, the same for ``d2ora simulate`` and ``d2ora peer``: the round
listeners (metrics files, TensorBoard and the console), checkpoints, the rounds loop, then the
outputs (each process its own peers' adapters; the monitor's process the consensus adapter, the
merged model, summary.json and the report)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from d2ora import atomic
from d2ora.config_io import to_yaml
from d2ora.data.generation import sample_answers
from d2ora.data.partition import format_label_table, label_counts
from d2ora.engine.checkpoint import Checkpointer
from d2ora.engine.exchange import Exchange, wire_itemsize
from d2ora.engine.loop import Collector, LoopState, RoundContext, RoundLoop, RunSettings
from d2ora.engine.memory import peak_memory
from d2ora.engine.metrics_log import MetricsLog
from d2ora.engine.monitor import ConsensusMonitor
from d2ora.engine.tensorboard_log import TensorBoardLog
from d2ora.recipes.console_view import ConsoleView
from d2ora.recipes.trust_run import LEDGER_DIR, TrustRun, folder_digests, rejection_summary
from d2ora.recipes.session import Session, remove_stale_outputs, save_consensus, save_peer_adapters, wire_dtype
from d2ora.report.model import RunSummary, TrustSummary

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"


def describe_setup(session: Session, console: Console) -> None:
    """The lines printed before training: model, graph, label table, budget."""
    config, data = session.config, session.data
    console.print(f"[bold]{config.model_name}[/bold] ({config.model.task}): {session.attach_report.summary()}")
    console.print(f"topology {session.network.description}")
    if data.labels is not None:
        counts = label_counts(data.labels, data.train_shards, data.n_classes)
        console.print(format_label_table(counts, data.class_names, title=f"training examples per peer ({config.data.partition_label()})"))
    console.print(
        f"{session.peers} peer(s), {config.run_name}, {config.run.rounds} rounds x {config.run.local_steps} local steps, "
        f"batch {config.peer_batch_size} per peer, {len(data.test)} test examples, on {session.device}"
    )


def run_summary(session: Session, rows: list[dict[str, Any]], runtime_s: float, saved: dict[str, Any],
                **extra: Any) -> RunSummary:
    """What summary.json holds (the report and ``d2ora compare`` read it), validated: a key of the
    wrong type fails here, at the end of the run that made it, not in a later compare."""
    config, data = session.config, session.data
    layout = session.host.layout
    message_bytes = session.share.message_numel * wire_itemsize(layout.dtype, wire_dtype(config))
    return RunSummary.model_validate({
        "name": config.run_name, "mixer": "centralized" if config.centralized else config.network.mixer,
        "robust": config.trust.robust, "share": config.network.share, "drift": config.network.drift, "prox_mu": config.network.prox_mu, "logit_adjust": config.network.logit_adjust, "attack": config.trust.attack, "byzantine": config.trust.byzantine, "method": config.method, "r": config.adapter.r, "model": config.model_name,
        "task": config.model.task, "metric": data.task.metric, "higher_is_better": data.task.higher_is_better, "peers": session.peers,
        "topology": session.network.description, "spectral_gap": session.network.spectral_gap,
        "partition": config.data.partition_label(), "rounds": config.run.rounds, "local_steps": config.run.local_steps,
        "mixing_steps": session.network.mixing_steps, "batch_size": config.peer_batch_size, "label_names": data.class_names,
        "label_counts": label_counts(data.labels, data.train_shards, data.n_classes).tolist() if data.labels is not None else None,
        "final": rows[-1], "runtime_s": runtime_s, **saved,
        "trainable_params_per_peer": session.attach_report.trainable_params, "message_bytes": message_bytes,
        "wire_dtype": config.network.wire_dtype, **extra,
    })


def trust_summary(trust: TrustRun, rejections: torch.Tensor, mode: str | None = None) -> TrustSummary:
    """summary.json's trust section: the ledgers, the rejected messages per sender and check, and
    this process's signing, checking and ledger time (seconds). ``mode``: the config's trust mode
    unless given (links always sign, whatever the config says)."""
    return TrustSummary.model_validate({"mode": mode or trust.config.trust.mode, "ledger": LEDGER_DIR, "run_id": trust.run_id.hex(),
                                         "rejected_total": int(rejections.sum()), "rejected_by_sender": rejection_summary(rejections),
                                         "seconds": {k: round(v, 4) for k, v in trust.seconds.items()}})


def gather_peak_memory(collector: Collector, device: torch.device, hosted: int, round_index: int) -> dict[str, Any] | None:
    """Every process's peak memory so far, in the monitor's process as summary.json's
    ``peak_memory_mb`` (one entry per process, in rank order) and ``peak_memory_kind``; None elsewhere.

    Each hosted peer's row carries its process's peak and a 1 on the process's first peer only, so
    the monitor keeps one entry per process without knowing how peers are laid out over processes."""
    peak, kind = peak_memory(device)
    rows = torch.zeros(hosted, 2, dtype=torch.float64)
    rows[:, 0] = peak
    rows[0, 1] = 1.0
    gathered = collector.gather_values(rows, round_index)
    if gathered is None:
        return None
    per_process = [round(float(v) / 2**20, 1) for v, first in gathered.tolist() if first == 1.0]
    return {"peak_memory_mb": per_process, "peak_memory_kind": kind}


def run_rounds_and_report(
    session: Session,
    output_dir: Path,
    *,
    exchange: Exchange,
    collector: Collector,
    checkpointer: Checkpointer,
    state: LoopState,
    rows: list[dict[str, Any]],
    resumed: bool,
    console: Console,
    started: float,
    trust: TrustRun | None = None,
    **summary_extra: Any,
) -> dict[str, Any] | None:
    """Run the remaining rounds from ``state`` and write the outputs; the monitor's process returns
    summary.json's content, the others None. ``console`` is quiet outside the monitor's process."""
    from d2ora.report import results_table, write_run_report

    config, host, network = session.config, session.host, session.network
    metric = session.data.task.metric
    monitor = collector.is_monitor
    listeners: list[Any] = []
    log = board = None
    if monitor:
        atomic.write_text(output_dir / CONFIG_FILE, to_yaml(config))
        log = MetricsLog(output_dir, metric, rows)
        listeners.append(log)
        if config.run.tensorboard:
            board = TensorBoardLog(output_dir, metric, purge_after=state.round if resumed else None)
            listeners.append(board)
    view = ConsoleView(console, metric, config.run.rounds, config.run.local_steps, start_round=state.round)
    listeners.append(view)

    def checkpoint(loop_state: LoopState) -> None:
        if checkpointer.due(loop_state.round, config.run.rounds):
            checkpointer.save(loop_state, log.rows if log is not None else None)

    settings = RunSettings(rounds=config.run.rounds, eval_every=config.run.eval_every, eval_peers=config.run.eval_peers, peers=session.peers)
    loop = RoundLoop(RoundContext(
        host=host, exchange=exchange, collector=collector, plan=session.plan, settings=settings,
        test_batches=session.test_batches, val_batches=session.val_batches,
        monitor=ConsensusMonitor(host, network.mixer, session.test_batches, members=config.honest_peers) if monitor else None,
        listeners=listeners, checkpoint=checkpoint, on_step=view.on_step,
        after_round=None if trust is None else trust.after_round,
    ))
    try:
        with view:
            state = loop.run(state)
    finally:
        if board is not None:
            board.close()

    save_peer_adapters(session, output_dir)
    rejections = None
    if trust is not None:
        rejections = collector.gather_values(trust.rejections.reshape(len(host.peer_ids), -1), config.run.rounds + 1)
    peaks = gather_peak_memory(collector, host.device, len(host.peer_ids), config.run.rounds + 2)
    if log is None:
        if trust is not None:
            trust.finish()
            trust.close()
        return None
    remove_stale_outputs(config, output_dir, session.peers)
    adapters = [f"adapters/peer-{k}" for k in range(session.peers)] if config.run.save_adapters else []
    saved: dict[str, Any] = {"adapters": adapters, **save_consensus(session, output_dir, state.consensus)}
    if trust is not None:
        assert rejections is not None
        trust.finish(lambda peer: folder_digests(output_dir, ["consensus"]) if peer == 0 else {})
        trust.close()
        summary_extra["trust"] = trust_summary(trust, rejections.reshape(session.peers, session.peers, -1))
    tokenizer = getattr(session.data.task, "tokenizer", None)
    if tokenizer is not None and config.run.generate_examples > 0:  # sft: a few answers side by side in the report
        summary_extra["samples"] = sample_answers(host.peer_model, tokenizer, session.test_batches, row=host.local(0),
                                                  consensus=state.consensus, device=host.device)
    if peaks is not None:
        summary_extra.update(peaks)
    summary = run_summary(session, log.rows, time.perf_counter() - started, saved, **summary_extra)
    summary.write(output_dir / SUMMARY_FILE)
    report_path = write_run_report(output_dir, summary, log.rows)
    console.print(results_table(summary, log.rows))
    console.print(f"report: {report_path} ({summary.runtime_s:.0f} s)")
    if board is not None:
        console.print(f"curves: tensorboard --logdir {output_dir}")
    return summary.to_dict()  # a plain dict, as callers (and tests) index it
