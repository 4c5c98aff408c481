"""A process of a torchrun job that dies (kill -9) is named by every survivor in one line.

Checked in process: how a failed torch.distributed call becomes that line (who, where, what next)
and what does not (d2ora's own errors keep their traceback). Checked with real processes: a worker
killed mid-run under ``d2ora peer``, and one that dies before the set-up check (``agree``) or the
final gathers, each survivor exits with code 2, names process 2, and prints no traceback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from d2ora.distributed.exchange import DistributedCollector, PeerSilentError
from d2ora.distributed.group import (
    FAILURE_KEY,
    DistributedSetupError,
    Group,
    ProcessLostError,
    guarded,
    process_device,
    symptom,
)
from d2ora.recipes.peer import _next_steps
from tests.test_distributed import (
    _wait_for_checkpoints,
    base_config,
    env,
    finish,
    free_port,
    spawn,
    write_config,
)

GLOO_RESET = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:5000: Connection "
              "reset by peer. This is typically caused by a remote worker hanging or bugs in the application.")


def _group(rank: int, store: dist.Store, world_size: int = 4) -> Group:
    return Group(rank, world_size, rank, "gloo", torch.device("cpu"), timedelta(seconds=5), store)


def _beating(store: dist.Store, ranks: list[int], stop: threading.Event) -> threading.Thread:
    """Heartbeats for the live processes of a fake job (the dead one's counter stays put)."""

    def beat() -> None:
        while not stop.is_set():
            for rank in ranks:
                store.add(f"beat/{rank}", 1)
            stop.wait(0.05)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    return thread


def test_a_failed_dist_call_becomes_one_line_naming_the_dead_process() -> None:
    store = dist.HashStore()
    stop = threading.Event()
    _beating(store, [0, 1, 3], stop)
    try:
        first = _group(1, store)
        first.describe = lambda r: f"process {r} (peer {r})"
        first.next_steps = lambda: "the run stops here; resume it"
        with pytest.raises(ProcessLostError) as caught, guarded(first, 3, "all_gather"):
            raise dist.DistBackendError(GLOO_RESET)
        line = str(caught.value)
        assert line == ("process 2 (peer 2) died or stopped answering in round 3 (all_gather: Read error "
                        "[127.0.0.1]:5000: Connection reset by peer): the run stops here; resume it")
        # The cause (not this process's next steps) waits in the store for the others ...
        assert store.get(FAILURE_KEY).decode() == line.rsplit(": the run stops", 1)[0]
        # ... who report it at once, with their own next steps, whatever their own symptom was.
        other = _group(3, store)
        started = time.monotonic()
        with pytest.raises(ProcessLostError) as caught, guarded(other, "at start-up, while comparing the config", "x"):
            raise RuntimeError("Connection closed by peer")
        assert time.monotonic() - started < 1
        assert str(caught.value).startswith("process 2 (peer 2) died or stopped answering in round 3 (all_gather")
        assert str(caught.value).endswith(": the run stops here; start it again")
    finally:
        stop.set()


def test_set_up_steps_are_named_and_own_errors_pass_through() -> None:
    store = dist.HashStore()
    stop = threading.Event()
    _beating(store, [0, 1], stop)  # 2 and 3 gone
    try:
        group = _group(0, store)
        with pytest.raises(ValueError, match="not a dist failure"), guarded(group, 1, "all_reduce"):
            raise ValueError("not a dist failure")
        assert not store.check([FAILURE_KEY])  # nothing was blamed on anyone
        expected = r"^process 2, process 3 died or stopped answering at start-up, while sharing the run nonce \(broadcast: boom\)"
        with pytest.raises(ProcessLostError, match=expected), guarded(group, "at start-up, while sharing the run nonce", "broadcast"):
            raise RuntimeError("boom")
    finally:
        stop.set()


def test_the_exchange_error_is_a_lost_process_error_and_symptoms_are_short() -> None:
    assert issubclass(PeerSilentError, ProcessLostError)
    assert symptom(RuntimeError(GLOO_RESET)) == "Read error [127.0.0.1]:5000: Connection reset by peer"
    assert len(symptom(RuntimeError("x" * 500))) == 120
    assert symptom(RuntimeError("")) == "RuntimeError"
    collector = DistributedCollector(_group(0, dist.HashStore()), [range(1)] * 4, 4, rounds=5)
    assert collector._where(5) == 5
    assert collector._where(6) == "while collecting the final results (after round 5)"


def test_next_steps_name_the_checkpoints_and_how_to_continue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHELASTIC_MAX_RESTARTS", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    steps = _next_steps(tmp_path, 1)
    assert steps() == "the run stops here, before its first checkpoint; start it again"
    for name in ("round-000002", "round-000003", ".round-000004.x.tmp"):
        (tmp_path / "checkpoints" / "rank-1" / name).mkdir(parents=True)
    assert steps().startswith("the run stops here; its checkpoints up to round 3 are kept (continue with d2ora peer "
                              f"--resume {tmp_path} under torchrun")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert "torchrun restarts the job from the newest checkpoint" in steps() and "round 3" in steps()


# ---------------------------------------------------------------------------------- processes
slow = pytest.mark.slow  # real processes, like tests/test_distributed.py


def _no_traceback(output: str) -> None:
    assert "Traceback" not in output and "frame #" not in output, output[-3000:]


@slow
def test_a_killed_worker_is_named_by_every_survivor_in_one_line(tiny_bert_dir: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.yaml", base_config(tiny_bert_dir, rounds=30, timeout_s=8))
    out = tmp_path / "out"
    procs = spawn([config] * 4, out)
    try:
        _wait_for_checkpoints(out, 4, 1)
        procs[2].kill()  # SIGKILL: no chance to say anything; its sockets close
        started = time.monotonic()
        for rank in (0, 1, 3):
            output = finish(procs[rank], timeout=90)
            assert procs[rank].returncode == 2, output[-3000:]
            _no_traceback(output)
            errors = [line for line in output.splitlines() if line.startswith("error:")]
            assert len(errors) == 1, output[-3000:]
            line = errors[0]
            assert line.startswith("error: process 2 (peer 2) died or stopped answering in round "), line
            assert "the run stops here; its checkpoints up to round " in line, line
            assert f"d2ora peer --resume {out}" in line and "--max-restarts" in line, line
        # Dying is noticed at once (a closed connection), not after the 8 s timeout chain.
        assert time.monotonic() - started < 60
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    for rank in (0, 1, 3):  # the survivors keep their checkpoints
        assert (out / "checkpoints" / f"rank-{rank}" / "round-000001").is_dir()


# Four bare processes of a job (no model): process 2 dies right before a set-up check or before the
# final gathers; the others run into it and print what they stop with.
SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from d2ora.distributed.exchange import DistributedCollector
    from d2ora.distributed.group import ProcessLostError, agree, start, stop
    import torch

    stage = sys.argv[1]
    group = start(float(sys.argv[2]), "cpu")
    group.describe = lambda r: f"process {r} (peer {r})"
    time.sleep(1.0)  # everyone has joined
    if group.rank == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        if stage == "agree":
            agree(group, "config", {"lr": 0.001})
        else:
            DistributedCollector(group, [range(r, r + 1) for r in range(4)], 4, rounds=3).gather_values(
                torch.zeros(1, 2), 4)
    except ProcessLostError as exc:
        print(f"error: {exc}", flush=True)
        stop(group, failed=True)
        sys.exit(2)
    stop(group)
    print("finished", flush=True)
""")


@slow
@pytest.mark.parametrize(("stage", "where"), [
    ("agree", "at start-up, while comparing the config"),
    ("final", "while collecting the final results (after round 3)"),
])
def test_a_death_at_set_up_or_in_the_final_gathers_is_named_too(stage: str, where: str) -> None:
    port = str(free_port())
    procs = []
    for rank in range(4):
        penv = {**env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-c", SCRIPT, stage, "8"], env=penv, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        for rank in (0, 1, 3):
            output = finish(procs[rank], timeout=60)
            _no_traceback(output)
            if stage == "final" and rank != 0 and procs[rank].returncode == 0:
                continue  # its results went out (gloo buffers a small send): its part is done
            assert procs[rank].returncode == 2, output[-3000:]
            assert f"error: process 2 (peer 2) died or stopped answering {where}" in output, output[-3000:]
        assert procs[2].wait(timeout=10) == -signal.SIGKILL
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.communicate()


# ------------------------------------------------------------------------------ the process's device
def fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize(("name", "local_rank", "gpus", "expected"), [
    ("auto", 3, 0, "cpu"),  # no GPU: every process on the CPU (gloo)
    ("auto", 1, 2, "cuda:1"),  # one GPU per process, by LOCAL_RANK
    ("cuda", 1, 2, "cuda:1"),  # a bare "cuda" too: torch's current device would put every process on GPU 0
    ("cuda:0", 1, 2, "cuda:0"),  # an index is taken as written
    ("cpu", 0, 2, "cpu"),
])
def test_each_process_takes_the_gpu_of_its_local_rank(monkeypatch: pytest.MonkeyPatch, name: str, local_rank: int,
                                                     gpus: int, expected: str) -> None:
    fake_gpus(monkeypatch, gpus)
    assert process_device(name, local_rank) == torch.device(expected)


@pytest.mark.parametrize(("name", "local_rank", "gpus"), [("auto", 1, 1), ("cuda", 2, 2), ("cuda:1", 0, 1), ("cuda", 0, 0)])
def test_a_gpu_the_machine_lacks_is_one_line_naming_the_fix(monkeypatch: pytest.MonkeyPatch, name: str, local_rank: int,
                                                           gpus: int) -> None:
    fake_gpus(monkeypatch, gpus)
    with pytest.raises(DistributedSetupError) as caught:
        process_device(name, local_rank)
    message = str(caught.value)
    assert "\n" not in message and f"LOCAL_RANK={local_rank}" in message and f"has {gpus} GPU(s)" in message
    assert f"--nproc_per_node {max(gpus, 1)}" in message and "run.device: cpu" in message
