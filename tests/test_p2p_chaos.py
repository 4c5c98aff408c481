"""Organisations as peer processes under faults, on 127.0.0.1 (issue 19's chaos tests; five peers with no faults
equal to ``d2ora simulate``: tests/test_p2p_peers.py).

- One of five is killed with -9 at round 2 and started again with ``--resume`` once the others
  reach round 4: the others never wait longer than the round deadline for it, their ledgers record
  it absent and their summaries say it came back; it rejoins (its ledger declares the rounds it
  missed, and ``d2ora ledger verify`` over every organisation's ledger accepts and explains the
  gap) and ends as close to the others as peers get in the same run without faults.
- A peer slowed by a sleep longer than the deadline in one round delays no one by more than it.

Every process is bounded (PROCESS_LIMIT_S) and the tests kill what is left in ``finally``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from d2ora.engine.metrics_log import read_rows
from d2ora.recipes.simulate import simulate
from d2ora.trust.ledger import ledger_path
from tests.conftest import simulate_config
from tests.test_distributed import REPO, base_config, env, write_config
from tests.test_p2p_peers import PROCESS_LIMIT_S, audit, flat, ledger_absences, organisations

pytestmark = pytest.mark.slow
PEERS = 5
#: A test-only wrapper that runs ``d2ora`` with one round of one peer slowed (see below).
SLOW_PEER = REPO / "tests" / "slow_peer.py"


class Peer:
    """One organisation's ``d2ora peer`` process, its output read line by line as it comes."""

    def __init__(self, config: Path | None, roster: Path, peer: int, out: Path, *, resume: bool = False,
                 sleep: tuple[int, float] | None = None) -> None:
        folder = out / f"peer-{peer}"
        source = ["--resume", str(folder)] if resume else ["--config", str(config), "--output-dir", str(folder)]
        program = [str(SLOW_PEER), str(sleep[0]), str(sleep[1])] if sleep else ["-m", "d2ora"]
        command = [sys.executable, *program, "peer", *source, "--roster", str(roster),
                   "--key", str(roster.parent / f"peer-{peer}.key"), "--run-id", "chaos"]
        self.proc = subprocess.Popen(command, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for_line(self, prefix: str, timeout_s: float = PROCESS_LIMIT_S) -> None:
        give_up = time.monotonic() + timeout_s
        with self._changed:
            while not any(line.startswith(prefix) for line in self.lines):
                remaining = give_up - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    pytest.fail(f"no line starting {prefix!r}:\n" + "".join(self.lines)[-3000:])
                self._changed.wait(min(remaining, 1.0))

    def finish(self) -> str:
        try:
            self.proc.wait(timeout=PROCESS_LIMIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"peer process did not stop within {PROCESS_LIMIT_S} s:\n" + "".join(self.lines)[-3000:])
        time.sleep(0.2)  # the reader thread drains the pipe
        output = "".join(self.lines)
        assert self.proc.returncode == 0 and "report:" in output, output[-3000:]
        return output

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def distance_to_the_others(adapters: dict[int, torch.Tensor], peer: int) -> float:
    """‖x_peer − mean of the others‖ / ‖mean of all‖: how far one peer ended from the rest."""
    others = torch.stack([x for p, x in adapters.items() if p != peer]).mean(0)
    everyone = torch.stack(list(adapters.values())).mean(0)
    return float((adapters[peer] - others).norm() / everyone.norm())


def test_a_peer_killed_at_round_2_and_restarted_at_round_4_rejoins(tiny_bert_dir: str, tmp_path: Path) -> None:
    victim, rounds, deadline = 2, 14, 2.0
    data = base_config(tiny_bert_dir, peers=PEERS, mixer="d2ora", rounds=rounds, topology="ring",
                       round_timeout_s=deadline, timeout_s=60, checkpoint_every=1)
    roster = organisations(tmp_path / "orgs", PEERS)
    config = write_config(tmp_path / "run.yaml", data)
    out = tmp_path / "links"
    peers = {p: Peer(config, roster, p, out) for p in range(PEERS)}
    try:
        peers[victim].wait_for_line("round 2:")
        os.kill(peers[victim].proc.pid, signal.SIGKILL)
        peers[victim].proc.wait()
        peers[0].wait_for_line("round 4:")
        peers[victim] = Peer(None, roster, victim, out, resume=True)
        outputs = {p: peer.finish() for p, peer in peers.items()}
    finally:
        for peer in peers.values():
            peer.kill()

    summaries = {p: json.loads((out / f"peer-{p}" / "summary.json").read_text()) for p in range(PEERS)}
    back = summaries[victim]["rejoined"]
    last, rejoined = back["resumed_from_round"], back["rejoined_round"]
    assert last in (1, 2) and 4 <= rejoined < rounds, back  # killed after its round-2 line; restarted once peer 0 ended round 4
    assert back["missed_rounds"] == list(range(last + 1, rejoined)) and back["mixed_from"] == [1, 3]
    assert f"peer {victim} rejoined in round {rejoined}" in outputs[victim]
    victim_rows = read_rows(out / f"peer-{victim}")
    assert [r["round"] for r in victim_rows] == [*range(last + 1), *range(rejoined, rounds + 1)]
    assert victim_rows[last + 1]["train_loss"] == [None]  # its rejoin round: it trained nothing

    for p in (1, 3):  # the victim's neighbours on the ring
        summary = summaries[p]
        assert summary["departed"] == []
        (stretch,) = [s for s in summary["returned"] if s["peer"] == victim]
        assert stretch["peer"] == victim and stretch["absent_from_round"] in (2, 3)
        # Back in its rejoin round (it sends the mix it took), or a round or two later on a loaded
        # machine (its first messages may miss the neighbours' deadline).
        assert rejoined - 1 <= stretch["absent_to_round"] <= rejoined + 1, (stretch, rejoined)
        assert stretch["back_in_round"] == stretch["absent_to_round"] + 1
        recorded = {(r, s) for r, s, _ in ledger_absences(ledger_path(out / f"peer-{p}", p))}
        assert recorded == {(a["round"], a["peer"]) for a in summary["absent"]}
        assert {r for r, s in recorded if s == victim} == set(range(stretch["absent_from_round"], stretch["absent_to_round"] + 1))
    for p in range(PEERS):
        if p == victim:
            continue
        # No round waited on the victim for longer than the deadline (and the exchange's own cost).
        waits = [r["round_seconds"]["exchange"] for r in read_rows(out / f"peer-{p}") if "round_seconds" in r]
        assert max(waits) < deadline + 1.5, (p, waits)

    verified = audit(out, roster, PEERS, tmp_path)
    assert f"gap: peer {victim} " in verified and f"rejoined in round {rejoined}" in verified

    # It ends as close to the others as peers of the same graph get without faults: within 1.5x of
    # the largest such distance (the faulty run's other peers land within about 1.1x of it too).
    reference = tmp_path / "simulated"
    simulate(simulate_config(**{**data, "output_dir": reference}))
    fault_free = {p: flat(reference / "adapters" / f"peer-{p}") for p in range(PEERS)}
    chaos = {p: flat(out / f"peer-{p}" / "adapters" / f"peer-{p}") for p in range(PEERS)}
    reached = max(distance_to_the_others(fault_free, p) for p in range(PEERS))
    assert distance_to_the_others(chaos, victim) <= 1.5 * reached, (distance_to_the_others(chaos, victim), reached)


def test_a_slow_peer_delays_no_one_beyond_the_deadline(tiny_bert_dir: str, tmp_path: Path) -> None:
    slow, slow_round, sleep_s, rounds, deadline = 2, 3, 6.0, 8, 2.0
    data = base_config(tiny_bert_dir, peers=PEERS, mixer="d2ora", rounds=rounds, topology="ring",
                       round_timeout_s=deadline, timeout_s=60)
    roster = organisations(tmp_path / "orgs", PEERS)
    config = write_config(tmp_path / "run.yaml", data)
    out = tmp_path / "links"
    peers = {p: Peer(config, roster, p, out, sleep=(slow_round, sleep_s) if p == slow else None) for p in range(PEERS)}
    try:
        for peer in peers.values():
            peer.finish()
    finally:
        for peer in peers.values():
            peer.kill()
    for p in range(PEERS):
        rows = read_rows(out / f"peer-{p}")
        waits = [r["round_seconds"]["exchange"] for r in rows if "round_seconds" in r]
        summary = json.loads((out / f"peer-{p}" / "summary.json").read_text())
        if p in (1, 3):  # its neighbours mixed without it while it slept, then with it again
            assert max(waits) < deadline + 1.5, (p, waits)
            late = {a["round"] for a in summary["absent"]}
            assert slow_round in late and rounds not in late, summary["absent"]
            assert all(a["peer"] == slow for a in summary["absent"])
        elif p != slow:  # waiting on its neighbours, who waited on the slow peer: never longer than the deadline
            assert max(waits) < deadline + 1.5, (p, waits)
            assert all(a["round"] != rounds for a in summary["absent"]), summary["absent"]
    # The run's record stays whole: the slow peer's late messages were refused as stale, not mixed.
    audit(out, roster, PEERS, tmp_path)
    ledgered = ledger_absences(ledger_path(out / "peer-1", 1))
    assert any(r == slow_round and s == slow for r, s, _ in ledgered)
