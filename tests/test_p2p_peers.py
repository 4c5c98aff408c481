"""``d2ora peer --roster --key``: one organisation per process over the gRPC links, on 127.0.0.1.

Checked against the simulator: peers started in any order (here in reverse) end with exactly the
adapters, train losses and own-adapter scores of ``d2ora simulate`` on the same config (relative
1e-6); a peer killed with -9 after round 1 is left out of the later rounds' mixes while the others
finish and record it absent (metrics, summary, ledger); a neighbour with another config is refused
by name of the key that differs (those three start processes: ``slow``). Fast, in one process:
``LinkExchange`` over real links delivers exactly what the simulator's in-memory exchange does
(bf16 wire, trust attachments), names a silent neighbour absent after the deadline, and treats a
wrong-length message as absent (or, under the trust layer, a bad frame for its checks).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from d2ora.cli import app

from d2ora.engine.exchange import Inbox, InMemoryExchange, Routes
from d2ora.engine.metrics_log import read_rows
from d2ora.p2p.certs import write_identity_certificate
from d2ora.p2p.exchange import Absence, LinkExchange
from d2ora.engine.group import differing_keys
from d2ora.p2p.group import LinkGroup, LinkSetupError
from d2ora.recipes.simulate import simulate
from d2ora.trust.identity import load_private_key, public_key_string, write_private_key
from d2ora.trust.ledger import Ledger, ledger_path
from tests.conftest import simulate_config
from tests.test_distributed import base_config, env, free_port, write_config

#: Bound on any one process (they stop by themselves long before; this only keeps a bug from hanging CI).
PROCESS_LIMIT_S = 240


def organisations(folder: Path, peers: int) -> Path:
    """A key and certificate per peer (what ``d2ora keygen`` writes) and a roster with loopback addresses."""
    entries = {}
    for peer in range(peers):
        key = write_private_key(folder / f"peer-{peer}.key")
        write_identity_certificate(folder / f"peer-{peer}.crt", key)
        entries[peer] = {"public_key": public_key_string(key), "certificate": f"peer-{peer}.crt",
                         "address": f"127.0.0.1:{free_port()}"}
    roster = folder / "roster.yaml"
    roster.write_text(yaml.safe_dump({"peers": entries}))
    return roster


def start_peer(config: Path, roster: Path, peer: int, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "d2ora", "peer", "--config", str(config), "--roster", str(roster),
               "--key", str(roster.parent / f"peer-{peer}.key"), "--output-dir", str(out / f"peer-{peer}"), "--run-id", "test"]
    return subprocess.Popen(command, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        output, _ = proc.communicate(timeout=PROCESS_LIMIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"peer process did not stop within {PROCESS_LIMIT_S} s:\n{output[-3000:]}")
    return proc.returncode, output


def flat(folder: Path) -> torch.Tensor:
    tensors = load_file(folder / "adapter_model.safetensors")
    return torch.cat([tensors[key].flatten() for key in sorted(tensors)])


@pytest.mark.slow
def test_link_peers_end_with_the_simulators_adapters(tiny_bert_dir: str, tmp_path: Path) -> None:
    # Five organisations on a star: the leaves are not each other's neighbours, and the hub's
    # weights differ from theirs.
    peers = 5
    data = base_config(tiny_bert_dir, peers=peers, mixer="decaf", rounds=2, topology="star")
    reference = tmp_path / "simulated"
    simulate(simulate_config(**{**data, "output_dir": reference}))
    roster = organisations(tmp_path / "orgs", peers)
    config = write_config(tmp_path / "run.yaml", data)
    out = tmp_path / "links"
    procs = {p: start_peer(config, roster, p, out) for p in reversed(range(peers))}  # any order: the last first
    for peer, proc in procs.items():
        code, output = finish(proc)
        assert code == 0 and "report:" in output, output[-3000:]
    simulated = read_rows(reference)
    for peer in range(peers):
        mine, want = flat(out / f"peer-{peer}" / "adapters" / f"peer-{peer}"), flat(reference / "adapters" / f"peer-{peer}")
        assert float((mine - want).norm() / want.norm()) < 1e-6, f"peer {peer}"
        rows = read_rows(out / f"peer-{peer}")
        assert [r["round"] for r in rows] == [r["round"] for r in simulated]
        for got, ref in zip(rows, simulated, strict=True):
            assert got["absent"] == []
            assert got["bytes_sent"] == [ref["bytes_sent"][peer]]
            if got["train_loss"][0] is not None:
                assert got["train_loss"][0] == pytest.approx(ref["train_loss"][peer], rel=1e-5)
            # Its own adapter after mixing, scored on the test split: the simulator's peer score.
            assert got["consensus_test"]["loss"] == pytest.approx(ref["peer_test"][peer]["loss"], rel=1e-5)
            assert got["peer_test"][0]["accuracy"] == ref["peer_test"][peer]["accuracy"]
        summary = json.loads((out / f"peer-{peer}" / "summary.json").read_text())
        assert summary["peer"] == peer and summary["absent"] == [] and summary["departed"] == []
        assert summary["trust"]["rejected_total"] == 0
        assert summary["trust"]["run_id"] == json.loads((out / "peer-0" / "summary.json").read_text())["trust"]["run_id"]
    # An auditor who collects every organisation's ledger (and adapter) verifies the whole run
    # against the roster: every envelope signed, every accepted one in its sender's ledger.
    audit(out, roster, peers, tmp_path)


def audit(out: Path, roster: Path, peers: int, tmp_path: Path) -> str:
    """``d2ora ledger verify`` over every organisation's ledger and adapters, as an auditor collects
    them; its output (it must verify)."""
    collected = tmp_path / "audit"
    for peer in range(peers):
        shutil.copytree(out / f"peer-{peer}" / "ledger", collected / "ledger", dirs_exist_ok=True)
        shutil.copytree(out / f"peer-{peer}" / "adapters", collected / "adapters", dirs_exist_ok=True)
    result = CliRunner().invoke(app, ["ledger", "verify", str(collected), "--roster", str(roster)])
    assert result.exit_code == 0 and f"verified: {peers} peers" in result.output, result.output
    return result.output


def ledger_absences(path: Path) -> list[tuple[int, int, str]]:
    """(round, sender, detail) of every ``absent`` record in a ledger's round blocks."""
    ledger = Ledger.open(path)
    try:
        found = []
        for block in ledger.blocks():
            if block.kind == "round":
                found += [(block.body["round"], r["sender"], r["detail"]) for r in block.body["rejected"] if r["check"] == "absent"]
        return found
    finally:
        ledger.close()


@pytest.mark.slow
def test_a_peer_killed_after_round_1_is_left_out_and_recorded(tiny_bert_dir: str, tmp_path: Path) -> None:
    peers, victim, rounds = 3, 2, 3
    data = base_config(tiny_bert_dir, peers=peers, mixer="decaf", rounds=rounds, round_timeout_s=5)
    roster = organisations(tmp_path / "orgs", peers)
    config = write_config(tmp_path / "run.yaml", data)
    out = tmp_path / "links"
    procs = {p: start_peer(config, roster, p, out) for p in range(peers)}
    # Killed the moment it prints its round-1 line (rounds take a fraction of a second here, so
    # polling its files could let it run to the end first).
    seen = []
    round_1 = threading.Event()

    def watch(stream) -> None:
        for line in stream:
            seen.append(line)
            if line.startswith("round 1:"):
                round_1.set()

    watcher = threading.Thread(target=watch, args=(procs[victim].stdout,), daemon=True)
    watcher.start()
    assert round_1.wait(PROCESS_LIMIT_S), "the victim never finished round 1:\n" + "".join(seen)[-3000:]
    os.kill(procs[victim].pid, signal.SIGKILL)
    procs[victim].wait()
    watcher.join(10)
    for peer in (0, 1):
        code, output = finish(procs[peer])
        assert code == 0 and "report:" in output, output[-3000:]
        folder = out / f"peer-{peer}"
        summary = json.loads((folder / "summary.json").read_text())
        (gone,) = summary["departed"]
        assert gone["peer"] == victim and gone["last_heard_round"] in (1, 2)
        # Killed after its round-1 metrics: round 3 surely happened without it.
        rows = read_rows(folder)
        assert [a["peer"] for a in rows[-1]["absent"]] == [victim] and rows[-1]["round"] == rounds
        assert all(a["peer"] == victim and "no message within 5 s" in a["reason"] for a in summary["absent"])
        assert {a["round"] for a in summary["absent"]} == set(range(gone["absent_from_round"], rounds + 1))
        recorded = ledger_absences(ledger_path(folder, peer))
        assert {(r, s) for r, s, _ in recorded} == {(a["round"], a["peer"]) for a in summary["absent"]}
        assert summary["final"]["train_loss"][0] is not None


@pytest.mark.slow
def test_a_neighbour_with_another_config_is_refused_by_key(tiny_bert_dir: str, tmp_path: Path) -> None:
    roster = organisations(tmp_path / "orgs", 2)
    same = write_config(tmp_path / "a.yaml", base_config(tiny_bert_dir, peers=2, topology="complete"))
    other = write_config(tmp_path / "b.yaml", base_config(tiny_bert_dir, peers=2, topology="complete", lr=1e-3))
    procs = [start_peer(same, roster, 0, tmp_path / "out"), start_peer(other, roster, 1, tmp_path / "out")]
    for peer, proc in enumerate(procs):
        code, output = finish(proc)
        assert code != 0 and "Traceback" not in output, output[-3000:]
        assert f"peer {1 - peer} runs a different config (differs in: optim.lr) from peer {peer}" in output, output[-3000:]


# ------------------------------------------------------------------ LinkExchange on its own (fast)
@pytest.fixture
def ring_links(tmp_path: Path):
    """Three peers on a ring, each with a started, connected PeerLink on 127.0.0.1."""
    from d2ora.p2p.link import PeerLink
    from d2ora.trust.identity import load_roster

    peers = 3
    roster = load_roster(organisations(tmp_path, peers))
    keys = {p: load_private_key(tmp_path / f"peer-{p}.key") for p in range(peers)}
    links = {p: PeerLink(p, keys[p], roster, [q for q in range(peers) if q != p]) for p in range(peers)}
    try:
        ports = {p: link.start() for p, link in links.items()}
        for link in links.values():
            link.connect(10, {q: f"127.0.0.1:{ports[q]}" for q in range(peers)}, strict=True)
        yield links
    finally:
        for link in links.values():
            link.close()


def ring_routes(peers: int = 3) -> Routes:
    weights = torch.full((peers, peers), 1.0 / peers)
    return Routes(weights)


def exchanged(exchanges: dict[int, LinkExchange], outgoing: dict[int, torch.Tensor], round_index: int,
              attachments: dict[int, dict] | None = None) -> dict[int, Inbox]:
    """Every given peer's exchange of one gossip step, run at once (each waits for its neighbours)."""
    with ThreadPoolExecutor(len(exchanges)) as pool:
        futures = {p: pool.submit(ex.exchange, outgoing[p], round_index, 0, attachments=(attachments or {}).get(p))
                   for p, ex in exchanges.items()}
        return {p: f.result(timeout=30) for p, f in futures.items()}


def test_link_exchange_delivers_what_the_in_memory_exchange_does(ring_links) -> None:
    routes, numel, extra = ring_routes(), 37, 16
    outgoing = {p: torch.randn(1, numel, generator=torch.Generator().manual_seed(p)) for p in range(3)}
    exchanges = {p: LinkExchange(routes, link, torch.float32, torch.bfloat16, round_timeout_s=20, attachment_bytes=extra)
                 for p, link in ring_links.items()}
    attachments = {p: {(p, q): bytes([p + 1]) * (5 + q) for q in range(3) if q != p} for p in range(3)}
    inboxes = exchanged(exchanges, outgoing, 1, attachments)
    stacked = torch.cat([outgoing[p] for p in range(3)])
    for p, inbox in inboxes.items():
        # The reference: the simulator's in-memory exchange of the same adapters at the same wire dtype.
        reference = InMemoryExchange(routes, range(3), torch.bfloat16).exchange(stacked, 1, 0)
        assert sorted(inbox.messages) == [(q, p) for q in range(3) if q != p]
        for pair, message in inbox.messages.items():
            assert torch.equal(message, reference.messages[pair])
            sender = pair[0]
            want = attachments[sender][pair]
            assert inbox.attachments[pair] == want + bytes(extra - len(want))  # zero-padded to the agreed size
        assert inbox.payload_bytes == {p: 2 * numel * 2}  # two neighbours, bf16
        assert inbox.wire_bytes == 2 * (40 + numel * 2 + extra)
        assert exchanges[p].absences == []


def test_a_silent_neighbour_is_absent_and_named(ring_links) -> None:
    routes = ring_routes()
    outgoing = {p: torch.full((1, 5), float(p)) for p in range(3)}
    exchanges = {p: LinkExchange(routes, ring_links[p], torch.float32, round_timeout_s=0.5) for p in (0, 1)}  # 2 is silent
    inboxes = exchanged(exchanges, outgoing, 1)
    for p, inbox in inboxes.items():
        other = 1 - p
        assert list(inbox.messages) == [(other, p)] and torch.equal(inbox.messages[(other, p)], outgoing[other][0])
        assert exchanges[p].absences == [Absence(2, 1, 0, "no message within 0.5 s")]
        assert list(exchanges[p].departed(rounds=1)) == [{"peer": 2, "last_heard_round": 0, "absent_from_round": 1}]
    # A message of the wrong length: absent without the trust layer, a bad frame for its checks with it.
    ring_links[2].send(0, 2, 0, b"\x00" * 7).result(timeout=10)
    ring_links[2].send(1, 2, 0, b"\x00" * 7).result(timeout=10)
    exchanges[1].attachment_bytes = 3
    inboxes = exchanged(exchanges, outgoing, 2)
    assert exchanges[0].absences[-1] == Absence(2, 2, 0, "a message of 7 bytes, expected 20")
    assert (2, 1) not in inboxes[1].messages and inboxes[1].bad_frames[(2, 1)] == "a message of 7 bytes, expected 23"


def test_link_groups_agree_with_their_neighbours_and_name_what_differs(ring_links) -> None:
    groups = {p: LinkGroup(link, [q for q in range(3) if q != p], 10, nonce=b"n" * 16) for p, link in ring_links.items()}

    def agree_all(payloads: dict[int, dict]) -> dict[int, Exception | None]:
        def one(p: int) -> Exception | None:
            try:
                groups[p].agree("config", payloads[p])
            except LinkSetupError as exc:
                return exc
            return None

        with ThreadPoolExecutor(3) as pool:
            return dict(zip(payloads, pool.map(one, payloads)))

    same = {"optim.lr": 1e-3, "adapter.r": 2}
    assert agree_all({p: same for p in range(3)}) == {0: None, 1: None, 2: None}
    # The second agreement (slot 1): peer 2 differs in two keys; its neighbours name it, it names one of them.
    outcome = agree_all({0: same, 1: same, 2: {"optim.lr": 3e-3, "adapter.r": 2, "run.seed": 1}})
    for p in (0, 1):
        assert f"peer 2 runs a different config (differs in: optim.lr, run.seed) from peer {p};" in str(outcome[p])
    assert "runs a different config (differs in: optim.lr, run.seed) from peer 2" in str(outcome[2])
    assert {p: g.fresh_nonce() for p, g in groups.items()} == {p: b"n" * 16 for p in range(3)}
    assert groups[0].resume_round(4) == 4 and groups[0].resume_round(None) is None  # each comes back alone
    # A neighbour that never answers is named after the deadline.
    quiet = LinkGroup(ring_links[0], [1, 2], 0.3, nonce=b"")
    with pytest.raises(LinkSetupError, match=r"peer 0: neighbour\(s\) \[1, 2\] sent no start-up message \(layout\) within 0.3 s"):
        quiet.agree("layout", {"dtype": "float32"})
    assert differing_keys({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 0}) == ["b", "c"]


def test_the_peer_command_names_a_key_not_on_the_roster(tmp_path: Path) -> None:
    roster = organisations(tmp_path / "orgs", 2)
    stranger = tmp_path / "stranger.key"
    write_private_key(stranger)
    result = CliRunner().invoke(app, ["peer", "--roster", str(roster), "--key", str(stranger), "--output-dir", str(tmp_path / "o")])
    assert result.exit_code != 0 and "is not on the roster" in result.output and "Traceback" not in result.output
    alone = CliRunner().invoke(app, ["peer", "--roster", str(roster)])
    assert alone.exit_code != 0 and "--roster and --key go together" in alone.output
