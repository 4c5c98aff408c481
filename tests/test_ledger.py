"""Per-peer signed ledgers and the run audit, on a synthetic 4-peer ring run of 2 rounds."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from d2ora.cli import app
from d2ora.trust.audit import verify_run
from d2ora.trust.envelope import EnvelopeHeader, parse, run_identity, seal
from d2ora.trust.identity import Member, Roster, load_roster
from d2ora.trust.ledger import (
    Ledger,
    LedgerError,
    Rejection,
    block_hash,
    file_digests,
    ledger_path,
    write_roster,
)
from d2ora.trust.merkle import merkle_root, verify_inclusion

PEERS = 4
ROUNDS = 2
STEPS = 2


def in_neighbours(i: int) -> list[int]:
    return sorted({(i - 1) % PEERS, (i + 1) % PEERS})


def out_neighbours(j: int) -> list[int]:
    return [i for i in range(PEERS) if j in in_neighbours(i)]


def sha(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


@dataclass
class Run:
    path: Path
    keys: list[Ed25519PrivateKey]
    roster: Roster
    run_id: bytes
    files: dict[int, list[str]]


def build_run(run_dir: Path, *, equivocate: tuple[int, int, int] | None = None, lie_sent: tuple[int, int, int] | None = None,
              bad_head: tuple[int, int, int] | None = None, stray: tuple[int, int, int] | None = None, rounds: range = range(1, ROUNDS + 1), final: bool = True,
              run: Run | None = None, salt: str = "") -> Run:
    """A ring run: each step every peer sends one payload to both ring neighbours.

    equivocate=(sender, round, step): the sender signs a second payload for its higher receiver.
    lie_sent=(sender, round, step): the sender's ledger records a payload it never sent.
    bad_head=(sender, receiver, round): that envelope carries a wrong ledger_head.
    stray=(sender, receiver, round): the receiver also accepts a (step 0) message from a non-neighbour.
    Round 2: peer 0 rejects peer 1's step-1 message (robust filter) and notes peer 3's step-0 timeout.
    """
    if run is None:
        keys = [Ed25519PrivateKey.generate() for _ in range(PEERS)]
        roster = Roster({p: Member(p, k.public_key(), f"site-{p}") for p, k in enumerate(keys)})
        write_roster(run_dir, roster)
        nonce, config, layout = bytes(range(32)), sha("config").hex(), sha("layout").hex()
        run_id = run_identity(nonce, config, roster.sha256, layout)
        for p, key in enumerate(keys):
            genesis = {"run_id": run_id.hex(), "nonce": nonce.hex(), "config_sha256": config,
                       "roster_sha256": roster.sha256, "layout_sha256": layout, "in_neighbours": in_neighbours(p)}
            Ledger.create(ledger_path(run_dir, p), p, key, genesis).close()
        run = Run(run_dir, keys, roster, run_id, {})
    ledgers = [Ledger.open(ledger_path(run_dir, p), run.keys[p]) for p in range(PEERS)]
    for rnd in rounds:
        heads = [led.head for led in ledgers]  # every envelope of a round carries its sender's head before it
        inbox: dict[int, list[bytes]] = {p: [] for p in range(PEERS)}
        rejected: dict[int, list[Rejection]] = {p: [] for p in range(PEERS)}
        sent: dict[int, list[tuple[int, bytes]]] = {p: [] for p in range(PEERS)}
        for step in range(STEPS):
            for j in range(PEERS):
                payload = sha(f"payload {salt}{rnd}/{step}/{j}")
                sent[j].append((step, sha("a lie") if lie_sent == (j, rnd, step) else payload))
                extra = [stray[1]] if stray is not None and stray[::2] == (j, rnd) and step == 0 else []
                for i in out_neighbours(j) + extra:
                    digest = sha("other") if equivocate == (j, rnd, step) and i == max(out_neighbours(j)) else payload
                    head = sha("not a head") if bad_head == (j, i, rnd) else heads[j]
                    header = EnvelopeHeader(run.run_id, rnd, step, j, i, 10, torch.float32, digest, head)
                    envelope = seal(header, run.keys[j]).to_bytes()
                    if rnd == 2 and (j, i, step) == (1, 0, 1):
                        rejected[i].append(Rejection(j, step, "norm", "update norm 41.2 > 10 x median", envelope))
                    elif rnd == 2 and (j, i, step) == (3, 0, 0):
                        rejected[i].append(Rejection(j, step, "timeout", "no message within 30 s"))
                    else:
                        inbox[i].append(envelope)
        for p, led in enumerate(ledgers):
            led.append_round(rnd, inbox[p], rejected[p], sent[p], sha(f"adapter {salt}{p}/{rnd}").hex())
    if final:
        for p, led in enumerate(ledgers):
            names = [f"adapters/peer-{p:04d}/adapter.bin"] + (["consensus/adapter.bin", "merged/model.bin"] if p == 0 else [])
            for name in names:
                (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
                (run_dir / name).write_bytes(f"{salt}{name} weights".encode() * 10)
            body = {"files": file_digests(run_dir, names)}
            if p == 0:
                body["consensus_adapter_sha256"] = body["files"]["consensus/adapter.bin"]
            led.append_final(body)
            run.files[p] = names
    for led in ledgers:
        led.close()
    return run


@pytest.fixture
def run(tmp_path: Path) -> Run:
    return build_run(tmp_path / "run")


def cli(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


def edit(run: Run, peer: int, sql: str, args: tuple = ()) -> None:
    with sqlite3.connect(ledger_path(run.path, peer)) as conn:
        conn.execute(sql, args)
    conn.close()


# --------------------------------------------------------------------------------- the ledger
def test_an_untouched_run_verifies(run: Run, tmp_path: Path) -> None:
    report = verify_run(run.path)
    assert report.ok, report.lines()
    # 4 peers x 2 in-neighbours x 2 steps x 2 rounds = 32 messages, 2 of them rejected by peer 0
    assert (report.peers, report.blocks, report.envelopes, report.rejections) == (4, 16, 30, 2)
    assert report.self_anchored
    result = cli("ledger", "verify", run.path)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "verified: 4 peers, 16 blocks, 30 envelopes, 2 rejected"
    trusted = tmp_path / "trusted-roster.json"
    shutil.copy(run.path / "ledger" / "roster.json", trusted)
    assert verify_run(run.path, load_roster(trusted)).ok
    assert cli("ledger", "verify", run.path, "--roster", trusted).exit_code == 0


def test_blocks_hold_what_was_appended(run: Run) -> None:
    with Ledger.open(ledger_path(run.path, 0)) as led:
        blocks = led.blocks()
        assert [b.kind for b in blocks] == ["genesis", "round", "round", "final"]
        assert led.last_round == 2 and led.head == bytes.fromhex(blocks[-1].hash) and led.peer == 0
        assert led.genesis().body["roster_sha256"] == run.roster.sha256 and led.genesis().body["peer"] == 0
        for b in blocks:
            assert b.hash == block_hash(b.index, b.kind, b.round, b.prev_hash, b.body)
            run.roster.key_of(0).verify(bytes.fromhex(b.signature), bytes.fromhex(b.hash))
        envelopes = led.envelopes(2)
        assert blocks[2].body["merkle_root"] == merkle_root([parse(e).digest for e in envelopes]).hex()
        assert blocks[2].body["accepted"] == len(envelopes) == 2  # peer 1 step 1 and peer 3 step 0 rejected
        rejections = led.rejections(2)
        assert [(r.sender, r.step, r.check) for r in rejections] == [(3, 0, "timeout"), (1, 1, "norm")]
        assert rejections[1].envelope is not None and len(rejections[1].envelope) == 224
        assert blocks[2].body["rejected"][1]["envelope_sha256"] == hashlib.sha256(rejections[1].envelope).hexdigest()
        assert blocks[2].body["rejected"][0]["envelope_sha256"] is None
        assert [s["step"] for s in blocks[1].body["sent"]] == [0, 1]
        assert set(blocks[3].body["files"]) == {"adapters/peer-0000/adapter.bin", "consensus/adapter.bin", "merged/model.bin"}


def _mutate(value: object) -> object:
    if isinstance(value, bool) or value is None:
        return 1
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value[:-1] + ("0" if value[-1:] != "0" else "1") if value else "x"
    if isinstance(value, list):
        return value[:-1] if value else [0]
    return {**value, "x": 1}


FIELDS = ("body", "prev_hash", "round", "signature", "hash")


@pytest.mark.parametrize("field", FIELDS)
def test_editing_any_field_of_any_block_is_named(run: Run, field: str) -> None:
    for peer in range(PEERS):
        path = ledger_path(run.path, peer)
        pristine = path.read_bytes()
        with Ledger.open(path) as led:
            blocks = led.blocks()
        for b in blocks:
            if field == "body":
                key = sorted(b.body)[b.index % len(b.body)]
                new = json.dumps({**b.body, key: _mutate(b.body[key])})
                edit(run, peer, "UPDATE blocks SET body = ? WHERE idx = ?", (new, b.index))
            else:
                edit(run, peer, f"UPDATE blocks SET {field} = ? WHERE idx = ?", (_mutate(getattr(b, field)), b.index))
            report = verify_run(run.path)
            assert not report.ok, (peer, b.index, field)
            first = report.lines()[0]
            assert first.startswith(f"ledger/peer-{peer:04d}.sqlite: peer {peer} block {b.index} "), (field, first)
            path.write_bytes(pristine)
    assert verify_run(run.path).ok


def test_the_cli_names_the_block_peer_and_file_first(run: Run) -> None:
    edit(run, 2, "UPDATE blocks SET body = json_set(body, '$.adapter_sha256', ?) WHERE idx = 1", ("ab" * 32,))
    result = cli("ledger", "verify", run.path)
    assert result.exit_code == 1
    first = result.output.splitlines()[0]
    assert first.startswith("ledger/peer-0002.sqlite: peer 2 block 1 (round 1): hash"), first
    # the edit also shows in the receivers' ledgers: peer 2's round-2 envelopes carry the original hash
    assert "carries ledger_head" in result.output


def test_a_changed_or_missing_saved_file_is_named(run: Run) -> None:
    target = run.path / "consensus" / "adapter.bin"
    data = bytearray(target.read_bytes())
    data[7] ^= 1
    target.write_bytes(bytes(data))
    report = verify_run(run.path)
    assert [p.file for p in report.problems] == ["consensus/adapter.bin"]
    assert report.lines()[0].startswith("ledger/peer-0000.sqlite: peer 0 block 3 (final): consensus/adapter.bin changed")
    (run.path / "adapters" / "peer-0003" / "adapter.bin").unlink()
    result = cli("ledger", "verify", run.path)
    assert result.exit_code == 1 and "adapters/peer-0003/adapter.bin is missing" in result.output


def test_dropping_or_swapping_blocks_fails(run: Run) -> None:
    path = ledger_path(run.path, 1)
    pristine = path.read_bytes()
    edit(run, 1, "DELETE FROM blocks WHERE idx = 1")
    report = verify_run(run.path)
    assert not report.ok and report.lines()[0].startswith("ledger/peer-0001.sqlite: peer 1 block 2")
    path.write_bytes(pristine)
    columns = "kind, round, prev_hash, body, hash, signature"
    edit(run, 1, f"UPDATE blocks SET ({columns}) = (SELECT {columns} FROM blocks AS b WHERE b.idx = 3 - blocks.idx) "
                 "WHERE idx IN (1, 2)")
    report = verify_run(run.path)
    assert not report.ok and report.lines()[0].startswith("ledger/peer-0001.sqlite: peer 1 block 1")
    path.write_bytes(pristine)
    path.write_bytes(pristine)
    # Cutting blocks off the end leaves a valid chain; only the other ledgers show it.
    for cut, last in (("idx = 3", "block 2 (round 2)"), ("idx >= 2", "block 1 (round 1)")):
        edit(run, 1, f"DELETE FROM blocks WHERE {cut}")
        report = verify_run(run.path)
        assert report.lines()[0].startswith(f"ledger/peer-0001.sqlite: peer 1 {last}: the ledger ends at"), report.lines()
        path.write_bytes(pristine)


def test_a_replaced_envelope_breaks_the_merkle_root(run: Run) -> None:
    with Ledger.open(ledger_path(run.path, 3)) as led:
        second = led.envelopes(1)[1]
    edit(run, 3, "UPDATE envelopes SET envelope = ? WHERE block_idx = 1 AND position = 0", (second,))
    lines = verify_run(run.path).lines()
    assert lines[0].startswith("ledger/peer-0003.sqlite: peer 3 block 1 (round 1): merkle_root")
    assert any("was accepted twice" in line for line in lines)


def test_a_swapped_roster_is_detected(run: Run, tmp_path: Path) -> None:
    trusted = tmp_path / "trusted-roster.json"
    shutil.copy(run.path / "ledger" / "roster.json", trusted)
    members = dict(run.roster.members)
    members[2] = Member(2, Ed25519PrivateKey.generate().public_key(), "site-2")
    write_roster(run.path, Roster(members))
    report = verify_run(run.path)  # the folder's own roster: genesis roster_sha256 and peer 2's signatures disagree
    assert report.lines()[0].startswith("ledger/peer-0002.sqlite: peer 2 block 0 (genesis): signature is not peer 2's")
    assert any("roster_sha256" in line for line in report.lines())
    result = cli("ledger", "verify", run.path, "--roster", trusted)  # the user's roster is the anchor
    assert result.exit_code == 1
    assert result.output.splitlines()[0].startswith("ledger/roster.json: differs from the roster given (--roster) for peer(s) [2]")


def test_a_wrong_ledger_head_is_named(tmp_path: Path) -> None:
    run = build_run(tmp_path / "run", bad_head=(1, 2, 2))  # both steps of round 2, peer 1 -> peer 2
    lines = verify_run(run.path).lines()
    assert len(lines) == 2, lines
    for line in lines:
        assert line.startswith("ledger/peer-0002.sqlite: peer 2 block 2 (round 2): accepted envelope")
        assert "carries ledger_head" in line and "peer 1's head when sending round 2" in line


def test_equivocation_is_its_own_category_with_proof(tmp_path: Path) -> None:
    run = build_run(tmp_path / "run", equivocate=(1, 2, 0))
    report = verify_run(run.path)
    assert report.problems == []
    first, *rest = report.equivocations
    assert (first.sender, first.round, first.step, first.receivers) == (1, 2, 0, (0, 2))
    assert first.message.startswith("peer 1 equivocated in round 2 step 0: it signed payload")
    a, b = (parse(bytes.fromhex(e)) for e in first.envelopes)
    assert a.signed_by(run.roster.key_of(1)) and b.signed_by(run.roster.key_of(1))
    assert a.header.slot == b.header.slot and a.header.payload_sha256 != b.header.payload_sha256
    # ... and peer 1's own sent record does not hold the second payload either
    assert [e.receivers for e in rest] == [(2,)] and "records payload" in rest[0].message
    result = cli("ledger", "verify", run.path)
    assert result.exit_code == 1 and result.output.startswith("peer 1 equivocated in round 2 step 0")


def test_a_sent_record_that_contradicts_the_signed_envelopes_is_equivocation(tmp_path: Path) -> None:
    run = build_run(tmp_path / "run", lie_sent=(3, 1, 1))
    report = verify_run(run.path)
    assert report.problems == [] and len(report.equivocations) == 1
    assert report.equivocations[0].message.startswith("peer 3 equivocated in round 1 step 1: its ledger (ledger/peer-0003.sqlite block 1)")


def test_prove_output_verifies_with_rfc6962(run: Run) -> None:
    result = cli("ledger", "prove", run.path, "--peer", 2, "--round", 2, "--json")
    assert result.exit_code == 0, result.output
    proofs = json.loads(result.output)
    assert sorted((p["receiver"], p["step"]) for p in proofs) == [(1, 0), (1, 1), (3, 0), (3, 1)]
    for p in proofs:
        envelope = bytes.fromhex(p["envelope"])
        assert parse(envelope).header.sender == 2 and hashlib.sha256(envelope).hexdigest() == p["leaf"]
        assert verify_inclusion(bytes.fromhex(p["leaf"]), p["leaf_index"], p["tree_size"],
                                [bytes.fromhex(h) for h in p["audit_path"]], bytes.fromhex(p["merkle_root"]))
        with Ledger.open(ledger_path(run.path, p["receiver"])) as led:
            assert led.blocks()[p["block"]].body["merkle_root"] == p["merkle_root"]
    readable = cli("ledger", "prove", run.path, "--peer", 2, "--round", 2)
    assert readable.exit_code == 0 and "peer 2 -> peer 1, round 2 step 0" in readable.output
    assert cli("ledger", "prove", run.path, "--peer", 2, "--round", 9).exit_code == 2


def test_show_lists_blocks_and_rejections(run: Run) -> None:
    wide = {"COLUMNS": "200"}  # rich reads the width from COLUMNS; 80 would wrap the cells
    result = CliRunner().invoke(app, ["ledger", "show", str(run.path)], env=wide)
    assert result.exit_code == 0, result.output
    assert all(f"peer {p}: peer-{p:04d}.sqlite" in result.output for p in range(PEERS))
    assert "2 (norm 1, timeout 1)" in result.output and "rejections by sender" in result.output
    one = CliRunner().invoke(app, ["ledger", "show", str(run.path), "--peer", "3"], env=wide)
    assert one.exit_code == 0 and "peer 3:" in one.output and "peer 0:" not in one.output
    assert cli("ledger", "show", run.path, "--peer", 7).exit_code == 2


# ------------------------------------------------------------------------------ ledger API
def test_rewind_moves_later_blocks_to_abandoned_and_the_resumed_run_verifies(run: Run) -> None:
    for p in range(PEERS):
        with Ledger.open(ledger_path(run.path, p), run.keys[p]) as led:
            round_1 = led.blocks()[1]
            assert led.rewind(1) == 2  # round 2 and the final block
            assert led.head == bytes.fromhex(round_1.hash) and led.last_round == 1
            assert [(a["kind"], a["round"]) for a in led.abandoned()] == [("round", 2), ("final", 2)]
            assert led.envelopes(2) == [] and led.rejections(2) == []
    # the resumed run redoes round 2 (not bit-identically) and finishes again
    build_run(run.path, rounds=range(2, 3), run=run, salt="resumed ")
    report = verify_run(run.path)
    assert report.ok, report.lines()
    assert report.abandoned == 8 and report.blocks == 16
    with sqlite3.connect(ledger_path(run.path, 0)) as conn:
        envelopes, rejections = conn.execute("SELECT envelopes, rejections FROM abandoned WHERE kind = 'round'").fetchone()
    conn.close()
    assert len(envelopes) == 2 * 224 and len(json.loads(rejections)) == 2  # nothing signed is thrown away


def test_rounds_must_be_appended_in_order(tmp_path: Path) -> None:
    run = build_run(tmp_path / "run", rounds=range(1, 2), final=False)
    with Ledger.open(ledger_path(run.path, 0), run.keys[0]) as led:
        for wrong in (3, 1, 0):
            with pytest.raises(LedgerError, match=rf"peer 0\): round {wrong} appended after round 1"):
                led.append_round(wrong, [], [], [], "0" * 64)
        with pytest.raises(LedgerError, match="cannot rewind to round 2"):
            led.rewind(2)
        led.append_round(2, [], [], [], "0" * 64)
        led.append_final({"files": {}})
        with pytest.raises(LedgerError, match="the ledger is final"):
            led.append_round(3, [], [], [], "0" * 64)
        with pytest.raises(LedgerError, match="224"):
            Ledger.open(ledger_path(run.path, 1), run.keys[1]).append_round(2, [b"short"], [], [], "0" * 64)


def test_refusals_are_one_clear_line(tmp_path: Path, run: Run) -> None:
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"definitely not a database " * 100)
    for path, message in ((junk, "is not a d2ora ledger: not an SQLite database"),
                          (tmp_path / "absent.sqlite", "does not exist")):
        with pytest.raises(LedgerError, match=message) as info:
            Ledger.open(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t(x)").connection.close()
    with pytest.raises(LedgerError, match="an SQLite database but not a d2ora ledger"):
        Ledger.open(other)
    with pytest.raises(LedgerError, match="already exists"):
        Ledger.create(ledger_path(run.path, 0), 0, run.keys[0], {})
    with pytest.raises(LedgerError, match="did not sign its genesis"):
        Ledger.open(ledger_path(run.path, 0), run.keys[1])
    with Ledger.open(ledger_path(run.path, 0)) as led, pytest.raises(LedgerError, match="read-only"):
        led.append_final({"files": {}})
    result = cli("ledger", "verify", tmp_path / "nowhere")
    assert result.exit_code == 2 and "does not exist" in result.output
    shutil.copy(junk, ledger_path(run.path, 1))
    report = verify_run(run.path)
    assert report.lines()[0].startswith("ledger/peer-0001.sqlite: ledger ") and "not an SQLite database" in report.lines()[0]


def test_a_message_from_outside_the_genesis_neighbourhood_is_named(tmp_path: Path) -> None:
    run = build_run(tmp_path / "run", stray=(2, 0, 1))  # on the ring, peer 0 hears from 1 and 3 only
    lines = verify_run(run.path).lines()
    assert len(lines) == 1 and "not one of the in-neighbours its genesis lists [1, 3]" in lines[0]
    assert lines[0].startswith("ledger/peer-0000.sqlite: peer 0 block 1 (round 1): accepted envelope")


def test_without_any_roster_nothing_can_be_trusted(run: Run) -> None:
    (run.path / "ledger" / "roster.json").unlink()
    report = verify_run(run.path)
    assert report.lines() == ["ledger/roster.json: missing, so no signature can be checked (give --roster)"]


def test_a_run_folder_with_uri_characters_in_its_name(tmp_path: Path) -> None:
    run = build_run(tmp_path / "run #2 ?x=1 %20", rounds=range(1, 2))
    assert verify_run(run.path).ok


def test_columns_edited_to_other_types_are_reported_not_crashed_on(run: Run) -> None:
    edit(run, 1, "UPDATE blocks SET kind = X'00ff' WHERE idx = 2")
    edit(run, 3, "UPDATE envelopes SET envelope = 'text' WHERE block_idx = 1 AND position = 1")
    lines = verify_run(run.path).lines()
    assert lines[0].startswith("ledger/peer-0001.sqlite: peer 1 block 2 (")
    assert any(line.startswith("ledger/peer-0003.sqlite: peer 3 block 1 (round 1): accepted envelope 1 does not parse")
               for line in lines)
