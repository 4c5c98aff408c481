"""Peers as processes: ``d2ora peer`` under torchrun (gloo, loopback) against the simulator.

A tiny random BERT keeps every process cheap. Checked: 4 processes with one peer each and 2 with
four each end with the simulator's adapters and metrics; different configs are refused; a silent
peer is named by every survivor; a worker killed with -9 under ``--max-restarts 1`` resumes and
finishes identical to an uninterrupted run; no run ever touches pickle-based collectives.
"""

from __future__ import annotations

import ast
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from d2ora.engine.metrics_log import read_rows
from d2ora.recipes.peer import torchrun_command
from d2ora.recipes.sections import migrate_flat
from d2ora.recipes.simulate import simulate
from d2ora.recipes.simulate_config import SimulateConfig
from tests.conftest import simulate_config
from tests.test_sft import tiny_llama_dir  # noqa: F401 (a fixture: a tiny Llama saved with a word tokenizer)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
GUARDED = REPO / "tests" / "guarded_peer.py"


def base_config(model: str, **changes) -> dict:
    return {
        "model": model, "peers": 4, "rounds": 2, "local_steps": 2, "batch_size": 2, "max_length": 24,
        "max_train_samples": 80, "max_test_samples": 12, "eval_batch_size": 12, "min_partition_size": 4,
        "r": 2, "lr": 3e-3, "save_merged": False, "tensorboard": False, "timeout_s": 20, **changes,
    }


def write_config(path: Path, data: dict) -> Path:
    """``data`` (flat keys, as the tests write them) as a sectioned YAML file."""
    flat = {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}
    path.write_text(yaml.safe_dump(migrate_flat(SimulateConfig, flat)))
    return path


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run_torchrun(procs: int, config: Path, out: Path, max_restarts: int = 0) -> subprocess.Popen:
    command = torchrun_command(procs, ["--config", str(config), "--output-dir", str(out)], max_restarts)
    return subprocess.Popen(command, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range. A port the kernel picks with
    bind(0) is in that range, and between this check and the process binding it, an outgoing
    connection (a peer dialling a neighbour not yet up, again and again) can take it as its source
    port: the peer then fails to listen and its neighbours wait out their start-up deadline."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default range starts here
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:  # a crowded range: fall back to the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(configs: list[Path], out: Path) -> list[subprocess.Popen]:
    """Processes started by hand (what torchrun does, minus restarts), each under the pickle guard."""
    port = str(free_port())
    procs = []
    for rank, config in enumerate(configs):
        penv = {**env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(len(configs)),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, str(GUARDED), "peer", "--config", str(config), "--output-dir", str(out)],
                                      env=penv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL) if proc.pid else None
        output, _ = proc.communicate()
        pytest.fail(f"process did not stop within {timeout} s:\n{output[-3000:]}")
    return output


def flat_adapters(out: Path, peers: int) -> list[torch.Tensor]:
    flats = []
    for k in range(peers):
        tensors = load_file(out / "adapters" / f"peer-{k}" / "adapter_model.safetensors")
        flats.append(torch.cat([tensors[key].flatten() for key in sorted(tensors)]))
    consensus = load_file(out / "consensus" / "adapter" / "adapter_model.safetensors")
    return flats + [torch.cat([consensus[key].flatten() for key in sorted(consensus)])]


def assert_same_run(ours: Path, reference: Path, peers: int, tolerance: float = 1e-5) -> None:
    for k, (a, b) in enumerate(zip(flat_adapters(ours, peers), flat_adapters(reference, peers), strict=True)):
        assert float((a - b).norm() / b.norm()) < tolerance, f"peer {k} (or the consensus at {peers})"
    for got, want in zip(read_rows(ours), read_rows(reference), strict=True):
        assert got["round"] == want["round"] and got["samples_seen"] == want["samples_seen"]
        assert got["bytes_sent"] == want["bytes_sent"]
        for a, b in zip(got["train_loss"], want["train_loss"]):
            assert (a is None and b is None) or abs(a - b) <= 1e-4 * abs(b)
        assert got["consensus_test"]["accuracy"] == want["consensus_test"]["accuracy"]
        assert abs(got["consensus_test"]["loss"] - want["consensus_test"]["loss"]) <= 1e-4 * want["consensus_test"]["loss"]
        assert [r["accuracy"] for r in got["peer_test"]] == [r["accuracy"] for r in want["peer_test"]]


@pytest.mark.parametrize(
    ("procs", "changes"),
    [
        (4, {"peers": 4, "mixer": "decaf"}),  # one peer per process: every message crosses processes
        (2, {"peers": 8, "mixer": "dimat", "wire_dtype": "bf16"}),  # four per process: ring neighbours in and across
        # K-GT's second message per step, and messages cut to the shared entries (m stays local).
        (2, {"peers": 4, "mixer": "d2ora", "drift": "kgt", "share": "direction"}),
    ],
    ids=["4x1-decaf", "2x4-dimat-bf16", "2x2-d2ora-kgt-direction"],
)
def test_processes_end_with_the_simulators_adapters_and_metrics(tiny_bert_dir: str, tmp_path: Path, procs: int,
                                                                 changes: dict) -> None:
    data = base_config(tiny_bert_dir, **changes)
    reference = tmp_path / "simulated"
    simulate(simulate_config(**{**data, "output_dir": reference}))
    out = tmp_path / "processes"
    output = finish(run_torchrun(procs, write_config(tmp_path / "run.yaml", data), out))
    assert "report:" in output, output[-3000:]
    assert_same_run(out, reference, data["peers"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == procs and summary["backend"] == "gloo"
    # One peak per process, each at least the frozen tiny model's weights (a real process is bigger).
    assert len(summary["peak_memory_mb"]) == procs and summary["peak_memory_kind"] == "cpu_rss"
    assert all(mb > 50 for mb in summary["peak_memory_mb"])
    simulated = json.loads((reference / "summary.json").read_text())
    assert len(simulated["peak_memory_mb"]) == 1
    assert summary["message_bytes"] == simulated["message_bytes"]
    if changes.get("wire_dtype") == "bf16":  # half the bytes of the fp32 adapter
        assert summary["message_bytes"] * 2 == 4 * summary["trainable_params_per_peer"]
    # Bytes on the wire: every message that crosses processes carries the payload and one header.
    blocks = [range(k * data["peers"] // procs, (k + 1) * data["peers"] // procs) for k in range(procs)]
    owner = {peer: k for k, block in enumerate(blocks) for peer in block}
    crossing = sum(owner[p] != owner[(p + d) % data["peers"]] for p in range(data["peers"]) for d in (-1, 1))
    row = read_rows(out)[1]
    # 64 header bytes per message: 0.6-1.2% of these toy 5-10 kB adapters, 0.005% of MiniLM r=8's
    # 1.4 MB (benchmarks/distributed_round.py measures the real ratio).
    messages_per_link = 2 if changes.get("drift") == "kgt" else 1  # K-GT also sends each update Δ
    assert row["wire_bytes"] == messages_per_link * crossing * (summary["message_bytes"] + 64)


def test_sft_processes_equal_the_simulator(tiny_llama_dir: str, tmp_path: Path) -> None:  # noqa: F811
    """The LLM path under torchrun: chat-format SFT of a Llama-architecture model (answer tokens only,
    greedy answers for generative accuracy) in 2 processes ends as the simulator's run does."""
    data = base_config(tiny_llama_dir, peers=4, mixer="decaf", task="sft", max_length=96, max_train_samples=60,
                       max_test_samples=4, eval_batch_size=4)
    sectioned = migrate_flat(SimulateConfig, {k: str(v) if isinstance(v, Path) else v for k, v in data.items()})
    sectioned.setdefault("data", {})["source"] = "bbc_news_sections"
    sectioned.setdefault("run", {})["generate_examples"] = 2
    reference = tmp_path / "simulated"
    simulate(SimulateConfig.model_validate({**sectioned, "run": {**sectioned["run"], "output_dir": str(reference)}}))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(sectioned))
    out = tmp_path / "processes"
    output = finish(run_torchrun(2, config, out))
    assert "report:" in output, output[-3000:]
    for k, (a, b) in enumerate(zip(flat_adapters(out, 4), flat_adapters(reference, 4), strict=True)):
        assert float((a - b).norm() / b.norm()) < 1e-5, f"peer {k} (or the consensus at 4)"
    for got, want in zip(read_rows(out), read_rows(reference), strict=True):
        assert got["bytes_sent"] == want["bytes_sent"]
        for key in ("answer_perplexity", "generative_accuracy"):
            assert got["consensus_test"][key] == pytest.approx(want["consensus_test"][key], rel=1e-4), key
    summary = json.loads((out / "summary.json").read_text())
    simulated = json.loads((reference / "summary.json").read_text())
    assert summary["task"] == "sft" and summary["processes"] == 2
    assert summary["samples"] == simulated["samples"]  # the same greedy answers, word for word


def test_processes_with_different_configs_refuse_to_start(tiny_bert_dir: str, tmp_path: Path) -> None:
    same = write_config(tmp_path / "a.yaml", base_config(tiny_bert_dir))
    other = write_config(tmp_path / "b.yaml", base_config(tiny_bert_dir, lr=1e-3, r=4))
    outputs = [finish(p) for p in spawn([same, other], tmp_path / "out")]
    for output in outputs:
        assert "process 1 runs a different config from process 0 (differs in: adapter.r, optim.lr)" in output, output[-2000:]
        assert "Traceback" not in output
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_signed_processes_reject_forgeries_and_their_ledgers_verify(tiny_bert_dir: str, tmp_path: Path) -> None:
    """4 processes with real key files: peer 1 forges its signatures; every forged message is
    rejected by its receiver, the run ends as the simulator's run of the same config, and
    ``d2ora ledger verify`` accepts the run folder the processes wrote together."""
    from typer.testing import CliRunner

    from d2ora.cli import app
    from d2ora.trust.identity import public_key_string, write_private_key

    keys = tmp_path / "keys"
    roster = {"peers": {str(p): public_key_string(write_private_key(keys / f"peer-{p}.key")) for p in range(4)}}
    (tmp_path / "roster.yaml").write_text(yaml.safe_dump(roster))
    data = base_config(tiny_bert_dir, mixer="decaf", trust="keys", roster=tmp_path / "roster.yaml", keys_dir=keys,
                       attack="forged_signature", byzantine=[1])
    reference = tmp_path / "simulated"
    simulate(simulate_config(**{**data, "output_dir": reference}))
    out = tmp_path / "processes"
    config = write_config(tmp_path / "run.yaml", data)
    outputs = [finish(p) for p in spawn([config] * 4, out)]
    assert "report:" in outputs[0], outputs[0][-3000:]
    assert_same_run(out, reference, 4)
    summary = json.loads((out / "summary.json").read_text())
    simulated = json.loads((reference / "summary.json").read_text())
    # ring of 4: peer 1 sends 2 messages a round, 2 rounds
    assert summary["trust"]["rejected_by_sender"] == simulated["trust"]["rejected_by_sender"] == {"1": {"signature": 4}}
    assert summary["trust"]["run_id"] != simulated["trust"]["run_id"]  # a fresh nonce per run
    row = read_rows(out)[1]
    assert row["wire_bytes"] == 8 * (summary["message_bytes"] + 64 + 224)  # payload, frame header, envelope
    result = CliRunner().invoke(app, ["ledger", "verify", str(out), "--roster", str(tmp_path / "roster.yaml")])
    assert result.exit_code == 0, result.output


def _wait_for_checkpoints(out: Path, ranks: int, round_index: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all((out / "checkpoints" / f"rank-{r}" / f"round-{round_index:06d}").is_dir() for r in range(ranks)):
            return
        time.sleep(0.01)
    pytest.fail(f"no round-{round_index} checkpoints from every process within {timeout} s")


def test_a_silent_peer_is_named_by_every_survivor(tiny_bert_dir: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.yaml", base_config(tiny_bert_dir, rounds=30, timeout_s=6))
    out = tmp_path / "out"
    procs = spawn([config] * 4, out)
    try:
        _wait_for_checkpoints(out, 4, 1)
        procs[2].send_signal(signal.SIGSTOP)  # alive but silent: no crash for anyone to notice
        started = time.monotonic()
        for rank in (0, 1, 3):
            output = finish(procs[rank], timeout=120)
            assert procs[rank].returncode == 2, output[-2000:]
            assert "process 2" in output and "round" in output and "Traceback" not in output, output[-2000:]
        assert time.monotonic() - started < 90  # stopped by the timeout, not hung
    finally:
        procs[2].kill()
        procs[2].communicate()
    for rank in range(4):  # the last checkpoints are kept
        assert (out / "checkpoints" / f"rank-{rank}" / "round-000001").is_dir()


def _descendants(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _worker_pids(job: int) -> dict[int, int]:
    """RANK -> pid of torchrun's d2ora worker processes (descendants of the torchrun process)."""
    found = {}
    for pid in _descendants(job):
        try:
            environ = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
            cmdline = Path(f"/proc/{pid}/cmdline").read_text()
        except OSError:
            continue
        if "RANK" in environ and "d2ora" in cmdline and "torch.distributed.run" not in cmdline:
            found[int(environ["RANK"])] = pid
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_kill_9_of_one_worker_with_max_restarts_finishes_identical(tiny_bert_dir: str, tmp_path: Path) -> None:
    data = base_config(tiny_bert_dir, rounds=3, mixer="decaf")
    config = write_config(tmp_path / "run.yaml", data)
    reference = tmp_path / "uninterrupted"
    finish(run_torchrun(4, config, reference))
    out = tmp_path / "killed"
    job = run_torchrun(4, config, out, max_restarts=1)
    _wait_for_checkpoints(out, 4, 1)
    workers = _worker_pids(job.pid)
    assert sorted(workers) == [0, 1, 2, 3], workers
    for pid in workers.values():  # freeze the job so the kill lands mid-run, whatever the timing
        os.kill(pid, signal.SIGSTOP)
    os.kill(workers[2], signal.SIGKILL)
    for rank, pid in workers.items():
        if rank != 2:
            os.kill(pid, signal.SIGCONT)
    output = finish(job)
    assert job.returncode == 0, output[-3000:]
    assert "resuming after round" in output
    assert_same_run(out, reference, data["peers"], tolerance=1e-6)


def test_distributed_code_never_names_pickle_based_calls() -> None:
    """Static half of the guard (the runs above execute under tests/guarded_peer.py, the runtime half)."""
    forbidden = {"pickle", "dill", "send_object_list", "recv_object_list", "broadcast_object_list",
                 "all_gather_object", "gather_object", "scatter_object_list", "load"}
    src = REPO / "src" / "d2ora"
    for path in [*(src / "distributed").glob("*.py"), *(src / "engine").glob("*.py"), *(src / "trust").glob("*.py"),
                 src / "recipes" / "peer.py", src / "recipes" / "trust_run.py"]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = {a.name.split(".")[0] for a in node.names} | {(getattr(node, "module", "") or "").split(".")[0]}
                assert not names & {"pickle", "dill"}, f"{path.name} imports pickle"
            if isinstance(node, ast.Attribute) and node.attr in forbidden - {"load"}:
                pytest.fail(f"{path.name} calls {node.attr}")
            if isinstance(node, ast.Attribute) and node.attr == "load" and getattr(node.value, "id", "") == "torch":
                pytest.fail(f"{path.name} calls torch.load")
