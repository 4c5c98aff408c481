"""A peer that leaves and comes back: the ledger's declared gap and its audit, the rejoin round's
mix without the peer's own adapter, the schedule moved on, and the link side (the newest round
waiting, a listen-only round, who came back). The processes themselves: tests/test_p2p_chaos.py."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from d2ora.cli import app
from d2ora.engine.exchange import Inbox, Routes
from d2ora.engine.round import neighbours_only
from d2ora.optim import linear_schedule
from d2ora.p2p.exchange import Absence, LinkExchange
from d2ora.p2p.frame import Frame
from d2ora.p2p.inbox import Inbox as LinkInbox
from d2ora.trust.audit import verify_run
from d2ora.trust.blocks import BodyError, RejoinRecord, RoundBody
from d2ora.trust.envelope import EnvelopeHeader, seal
from d2ora.trust.ledger import Ledger, LedgerError, Rejection, file_digests, ledger_path
from tests.test_ledger import PEERS, Run, build_run, in_neighbours, out_neighbours, sha

VICTIM = 2


def gossip_round(run: Run, rnd: int, present: set[int], *, sent_by_victim: bool = False,
                 rejoined: RejoinRecord | None = None) -> None:
    """One round of the ring (one gossip step) among ``present``; the victim also signs and sends its
    messages when ``sent_by_victim`` but appends no block (it stops right after sending).
    ``rejoined``: the victim's block of this round is its rejoin block (it sends the mix it took)."""
    ledgers = {p: Ledger.open(ledger_path(run.path, p), run.keys[p]) for p in range(PEERS)}
    try:
        heads = {p: led.head for p, led in ledgers.items()}
        inbox: dict[int, list[bytes]] = {p: [] for p in range(PEERS)}
        sent: dict[int, list[tuple[int, bytes]]] = {p: [] for p in range(PEERS)}
        senders = present | ({VICTIM} if sent_by_victim else set())
        for j in sorted(senders):
            payload = sha(f"payload {rnd}/{j}")
            sent[j].append((0, payload))
            for i in out_neighbours(j):
                header = EnvelopeHeader(run.run_id, rnd, 0, j, i, 10, torch.float32, payload, heads[j])
                inbox[i].append(seal(header, run.keys[j]).to_bytes())
        for p in sorted(present):
            absent = [Rejection(j, 0, "absent", "no message within 5 s") for j in in_neighbours(p) if j not in senders]
            extra = {"rejoined": rejoined} if p == VICTIM and rejoined is not None else {}
            ledgers[p].append_round(rnd, inbox[p], absent, sent[p], sha(f"adapter {rnd}/{p}").hex(), **extra)
    finally:
        for led in ledgers.values():
            led.close()


def finish(run: Run) -> None:
    for p in range(PEERS):
        name = f"adapters/peer-{p}/adapter.bin"
        (run.path / name).parent.mkdir(parents=True, exist_ok=True)
        (run.path / name).write_bytes(b"weights")
        with Ledger.open(ledger_path(run.path, p), run.keys[p]) as led:
            led.append_final({"files": file_digests(run.path, [name])})


def run_with_a_gap(tmp_path: Path) -> Run:
    """Round 1 by all; the victim sends its round-2 messages and stops; rounds 2-3 without it;
    it rejoins in round 4 (from its round-1 checkpoint) and takes part in round 5."""
    run = build_run(tmp_path / "run", rounds=range(1, 2), final=False)
    everyone = set(range(PEERS))
    gossip_round(run, 2, everyone - {VICTIM}, sent_by_victim=True)
    gossip_round(run, 3, everyone - {VICTIM})
    gossip_round(run, 4, everyone, rejoined=RejoinRecord(2, 3, "restarted from its round-1 checkpoint"))
    gossip_round(run, 5, everyone)
    finish(run)
    return run


def test_a_declared_gap_verifies_and_is_explained(tmp_path: Path) -> None:
    run = run_with_a_gap(tmp_path)
    report = verify_run(run.path, run.roster)
    assert report.ok, report.lines()
    (gap,) = report.gaps
    assert (gap.peer, list(gap.missed), gap.rejoined_round) == (VICTIM, [2, 3], 4)
    assert gap.message.startswith(f"peer {VICTIM} missed rounds 2-3, rejoined in round 4 (")
    assert report.notes == []  # its round-2 envelopes carry its round-1 head, which its ledger still holds
    result = CliRunner().invoke(app, ["ledger", "verify", str(run.path)])
    assert result.exit_code == 0 and "verified: 4 peers" in result.output
    assert f"gap: peer {VICTIM} missed rounds 2-3, rejoined in round 4" in result.output


def test_messages_signed_in_missed_rounds_are_notes_not_problems(tmp_path: Path) -> None:
    # It sent round 2 and round 3 before stopping: round 3's messages carry the head of a round-2
    # block its rewound ledger no longer holds.
    run = build_run(tmp_path / "run", rounds=range(1, 2), final=False)
    everyone = set(range(PEERS))
    gossip_round(run, 2, everyone)
    gossip_round(run, 3, everyone - {VICTIM}, sent_by_victim=True)
    with Ledger.open(ledger_path(run.path, VICTIM), run.keys[VICTIM]) as led:
        led.rewind(1)  # its checkpoint was of round 1
    gossip_round(run, 4, everyone, rejoined=RejoinRecord(2, 3, "restarted from its round-1 checkpoint"))
    finish(run)
    report = verify_run(run.path, run.roster)
    assert report.ok, report.lines()
    assert len(report.notes) == 2 and all(f"peer {VICTIM}'s message of round 3" in n for n in report.notes)


def test_an_undeclared_or_misplaced_gap_is_refused(tmp_path: Path) -> None:
    run = build_run(tmp_path / "run", rounds=range(1, 2), final=False)
    with Ledger.open(ledger_path(run.path, 0), run.keys[0]) as led:
        with pytest.raises(LedgerError, match="round 3 appended after round 1"):
            led.append_round(3, [], [], [], "0" * 64)
        with pytest.raises(LedgerError, match="rejoins after round 2, but the ledger's last round is 1"):
            led.append_round(4, [], [], [], "0" * 64, rejoined=RejoinRecord(3, 3, "x"))
    with pytest.raises(BodyError, match="rejoined.missed_to' must be the round before this one"):
        RoundBody(4, "0" * 64, 0, (), (), "0" * 64, RejoinRecord(2, 2, "x"))
    with pytest.raises(BodyError, match="round body: 'rejoined.detail' must be a string"):
        RoundBody.from_body({"round": 3, "merkle_root": "0" * 64, "accepted": 0, "rejected": [], "sent": [],
                             "adapter_sha256": "0" * 64, "rejoined": {"missed_from": 2, "missed_to": 2, "detail": 7}})
    # Round-tripped through JSON as the ledger stores it.
    body = RoundBody(3, "0" * 64, 0, (), (), "0" * 64, RejoinRecord(2, 2, "back"))
    assert RoundBody.from_body(body.to_body()) == body
    assert "rejoined" not in RoundBody(3, "0" * 64, 0, (), (), "0" * 64).to_body()


def test_the_rejoin_mix_gives_the_own_weight_to_the_neighbours() -> None:
    # Hand computation: rows (own, a, b) with weights (1/3, 1/3, 1/3) -> (0, 1/2, 1/2); a held row
    # (0.5, 0.3) over (own, a) of a full row summing to 1 keeps its sum: (0, 1).
    weights = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.3, 0.5, 0.2]], dtype=torch.float64)
    moved = neighbours_only(weights, torch.tensor([0, 1]), [7, 8])
    assert torch.allclose(moved, torch.tensor([[0, 0.5, 0.5], [0.6, 0, 0.4]], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"peer\(s\) \[8\] hold no neighbour's message"):
        neighbours_only(torch.tensor([[0.5, 0.5], [1.0, 0.0]]), torch.tensor([1, 0]), [7, 8])


def test_skip_steps_leaves_the_schedule_where_training_would() -> None:
    from d2ora.engine.local_steps import LocalTrainer

    def trainer(steps_done: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        param = torch.nn.Parameter(torch.zeros(3))
        optimizer = torch.optim.AdamW([param], lr=2e-3)
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3})
        scheduler = linear_schedule(optimizer, 40, 0.1)
        for _ in range(steps_done):
            optimizer.step()
            scheduler.step()
        return optimizer, scheduler

    trained, trained_schedule = trainer(17)
    skipped, skipped_schedule = trainer(5)
    fake = LocalTrainer.__new__(LocalTrainer)  # only the optimizer and the scheduler matter here
    fake.optimizer, fake.scheduler = skipped, skipped_schedule
    fake.skip_steps(12)
    assert skipped_schedule.last_epoch == trained_schedule.last_epoch == 17
    assert [g["lr"] for g in skipped.param_groups] == pytest.approx([g["lr"] for g in trained.param_groups], rel=1e-12)
    assert skipped_schedule.get_last_lr() == pytest.approx(trained_schedule.get_last_lr())
    with pytest.raises(ValueError, match="steps must be >= 0"):
        fake.skip_steps(-1)


# ----------------------------------------------------------------------------------- the links
def test_the_newest_waiting_round_names_where_the_run_is() -> None:
    inbox = LinkInbox()
    assert inbox.newest_round([1, 2], after=3, slot=0, deadline_s=0.05) is None
    for sender, rnd, slot in ((1, 2, 0), (1, 5, 1), (3, 9, 0), (2, 4, 0), (1, 6, 0)):
        inbox.put(Frame(sender, rnd, slot, b"x"))
    # Only the given senders' first-slot messages after round 3: peer 3 is no in-neighbour.
    assert inbox.newest_round([1, 2], after=3, slot=0, deadline_s=1) == 6
    assert inbox.newest_round([2], after=4, slot=0, deadline_s=0.05) is None
    late = LinkInbox()
    threading.Timer(0.2, lambda: late.put(Frame(2, 7, 0, b"x"))).start()
    started = time.monotonic()
    assert late.newest_round([2], after=0, slot=0, deadline_s=10) == 7
    assert time.monotonic() - started < 5  # woken by the arrival, not the deadline


class RecordingLink:
    """A PeerLink's two calls, recorded (what LinkExchange sends and waits for)."""

    def __init__(self, peer: int, arrived: dict[int, bytes]) -> None:
        self.peer, self.arrived, self.sent = peer, arrived, []
        self.inbox = LinkInbox()

    def drop_before(self, round: int) -> int:
        return 0

    def send(self, to: int, round: int, slot: int, payload: bytes):
        self.sent.append((to, round, slot))
        from concurrent.futures import Future

        done: Future = Future()
        done.set_result(b"")
        return done

    def receive(self, from_ids, round: int, slot: int, deadline_s: float):
        from d2ora.p2p.inbox import Received

        got = {j: self.arrived[j] for j in from_ids if j in self.arrived}
        return Received(got, [j for j in from_ids if j not in got], round, slot, deadline_s)


def test_a_listen_only_round_sends_nothing_and_receives_as_usual() -> None:
    routes = Routes(torch.full((3, 3), 1 / 3))
    message = torch.arange(4, dtype=torch.float32)
    link = RecordingLink(0, {1: message.numpy().tobytes()})
    exchange = LinkExchange(routes, link, torch.float32, round_timeout_s=1)  # type: ignore[arg-type]
    exchange.listen_only = 5
    inbox: Inbox = exchange.exchange(torch.zeros(1, 4), 5, 0)
    assert link.sent == [] and inbox.payload_bytes == {0: 0}
    assert torch.equal(inbox.messages[(1, 0)], message)
    assert exchange.absences == [Absence(2, 5, 0, "no message within 1 s")]
    exchange.exchange(torch.zeros(1, 4), 6, 0)
    assert sorted(link.sent) == [(1, 6, 0), (2, 6, 0)]


def test_a_neighbour_absent_for_a_stretch_and_heard_again_has_returned() -> None:
    routes = Routes(torch.full((3, 3), 1 / 3))
    link = RecordingLink(0, {})
    exchange = LinkExchange(routes, link, torch.float32, round_timeout_s=1)  # type: ignore[arg-type]
    exchange.absences = [Absence(2, r, 0, "no message") for r in (2, 3, 4, 7)] + [Absence(1, 8, 0, "no message")]
    exchange.last_heard = {1: 7, 2: 6}
    assert list(exchange.returned()) == [{"peer": 2, "absent_from_round": 2, "absent_to_round": 4, "back_in_round": 5}]
    assert list(exchange.departed(8)) == [{"peer": 1, "last_heard_round": 7, "absent_from_round": 8},
                                          {"peer": 2, "last_heard_round": 6, "absent_from_round": 7}]
