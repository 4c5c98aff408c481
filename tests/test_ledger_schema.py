"""The block body dataclasses (d2ora.trust.blocks): they round-trip, they write exactly the JSON the
ledger always wrote, the auditor names a malformed body's field, and the one rejection summary."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from d2ora.recipes.trust_run import rejection_summary as run_rejection_summary
from d2ora.trust.audit import AuditError, inclusion, rejection_summary, verify_run
from d2ora.trust.blocks import (
    BodyError,
    FinalBody,
    GenesisBody,
    RejectedRecord,
    RoundBody,
    SentRecord,
    parse_body,
)
from d2ora.trust.checks import CHECKS
from d2ora.trust.ledger import (
    Ledger,
    LedgerError,
    Rejection,
    canonical_json,
    ledger_path,
)
from d2ora.trust.merkle import merkle_root
from d2ora.trust.rejections import rejected_by_sender
from tests.test_ledger import PEERS, build_run


def h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


GENESIS = GenesisBody(peer=1, run_id=h("run"), nonce="00" * 16, config_sha256=h("config"), roster_sha256=h("roster"),
                      layout_sha256=h("layout"), in_neighbours=(0, 2))
ROUND = RoundBody(round=1, merkle_root=h("root"), accepted=2,
                  rejected=(RejectedRecord(2, 1, "norm", "update norm 41.2 > 10 x median", h("envelope")),
                            RejectedRecord(0, 0, "timeout", "no message within 30 s", None)),
                  sent=(SentRecord(0, h("p0")), SentRecord(1, h("p1"))), adapter_sha256=h("adapter"))
FINAL = FinalBody(files={"adapters/peer-1/adapter.bin": h("weights")}, extra={"consensus_adapter_sha256": h("c")})


# ------------------------------------------------------------------------------ the dataclasses
@pytest.mark.parametrize("body", [GENESIS, replace(GENESIS, in_neighbours=None, extra={"note": [1]}),
                                  ROUND, RoundBody(2, h("empty"), 0, (), (), h("a")), FINAL, FinalBody({})],
                         ids=["genesis", "genesis-open", "round", "round-empty", "final", "final-empty"])
def test_a_body_round_trips(body: GenesisBody | RoundBody | FinalBody) -> None:
    assert type(body).from_body(body.to_body()) == body
    kind = {GenesisBody: "genesis", RoundBody: "round", FinalBody: "final"}[type(body)]
    assert parse_body(kind, body.to_body()) == body
    assert type(body).from_body(json.loads(canonical_json(body.to_body()))) == body  # through the file


def test_an_optional_genesis_field_stays_absent() -> None:
    body = replace(GENESIS, in_neighbours=None).to_body()
    assert "in_neighbours" not in body and body["peer"] == 1


# The blocks a fixed key writes for fixed inputs, as the ledger wrote them before the body
# dataclasses existed (Ed25519 signatures are deterministic): the block hashes cover index, kind,
# round, prev_hash and the body's canonical JSON, so they pin the on-disk format.
OLD_HASHES = ["0b17a95fe54be25a245809def015d8b3cf351acb80f9a987184f1075f41a3699",
              "bc2135b13b893d68ce4d7387081ad0abcdc866496b32b81e206b612bf77a28f3",
              "ac67c050b18d42d8d1bc43892a51e94443748ae1c9331b50f89159841b0921cc"]
OLD_ROUND_BODY = (
    '{"accepted":2,"adapter_sha256":"ae1eae1d76e5b7c865c4122ce366a08025842566d2d96c75cc13e6353a73db0d",'
    '"merkle_root":"5998c9d86f445c6dd22c88459bd2050518ebac7a223339334d464d6d15f5d2b0","rejected":[{"check":"norm",'
    '"detail":"update norm 41.2 > 10 x median","envelope_sha256":'
    '"a9ff8025a62a20ae5d18b6af9faae4d97e25cb9b95dd876ec8e271bb3a3a40e1","sender":2,"step":1},{"check":"timeout",'
    '"detail":"no message within 30 s","envelope_sha256":null,"sender":0,"step":0}],"round":1,"sent":[{"payload_sha256":'
    '"169b5b823c62b64ca7e5f8456a13c8d5d06f4ece522a58bc2b8a784dcf3609b0","step":0},{"payload_sha256":'
    '"f64551fcd6f07823cb87971cfb91446425da18286b3ab1ef935e0cbd7a69f68a","step":1}]}')


def test_bodies_serialise_to_exactly_what_the_ledger_wrote(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    accepted = [bytes([7]) * 224, bytes([9]) * 224]
    rejected = [Rejection(2, 1, "norm", "update norm 41.2 > 10 x median", bytes([3]) * 224),
                Rejection(0, 0, "timeout", "no message within 30 s")]
    sent = [(0, hashlib.sha256(b"p0").digest()), (1, hashlib.sha256(b"p1").digest())]
    path = tmp_path / "peer-0001.sqlite"
    genesis = {k: v for k, v in GENESIS.to_body().items() if k != "peer"} | {"in_neighbours": [0, 2]}
    with Ledger.create(path, 1, key, genesis) as led:  # the existing, dict-taking API
        led.append_round(1, accepted, rejected, sent, h("adapter"))
        led.append_final(FINAL.to_body())
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT kind, body, hash FROM blocks ORDER BY idx").fetchall()
    conn.close()
    assert [r[2] for r in rows] == OLD_HASHES
    assert rows[1][1] == OLD_ROUND_BODY
    # the same round body, built by the dataclass from the same inputs
    built = RoundBody(round=1, merkle_root=merkle_root([hashlib.sha256(e).digest() for e in accepted]).hex(),
                      accepted=2, rejected=tuple(r.as_record() for r in rejected),
                      sent=tuple(SentRecord(s, d.hex()) for s, d in sent), adapter_sha256=h("adapter"))
    assert canonical_json(built.to_body()) == OLD_ROUND_BODY
    for kind, text, _ in rows:  # and every stored body reads and writes back byte for byte
        assert canonical_json(parse_body(kind, json.loads(text)).to_body()) == text


@pytest.mark.parametrize(("kind", "body", "message"), [
    ("round", {k: v for k, v in ROUND.to_body().items() if k != "adapter_sha256"}, "round body: 'adapter_sha256' is missing"),
    ("round", {**ROUND.to_body(), "accepted": True}, "round body: 'accepted' must be an integer, not a boolean"),
    ("round", {**ROUND.to_body(), "accepted": 2.0}, "round body: 'accepted' must be an integer, not a number"),
    ("round", {**ROUND.to_body(), "merkle_root": "AB" * 32}, "round body: 'merkle_root' must be 64 lower-case hex digits"),
    ("round", {**ROUND.to_body(), "sent": {}}, "round body: 'sent' must be an array, not an object"),
    ("round", {**ROUND.to_body(), "extra": 1}, "round body: 'extra' is not a field of a round body"),
    ("round", {**ROUND.to_body(), "rejected": [{**ROUND.rejected[0].to_body(), "step": "1"}]},
     "round body: 'rejected[0].step' must be an integer, not a string"),
    ("round", {**ROUND.to_body(), "sent": [{"step": 0}]}, "round body: 'sent[0].payload_sha256' is missing"),
    ("round", [], "round body must be an object, not an array"),
    ("genesis", {k: v for k, v in GENESIS.to_body().items() if k != "nonce"}, "genesis body: 'nonce' is missing"),
    ("genesis", {**GENESIS.to_body(), "in_neighbours": [0, "2"]}, "genesis body: 'in_neighbours[1]' must be an integer"),
    ("genesis", {**GENESIS.to_body(), "in_neighbours": None}, "genesis body: 'in_neighbours' must be an array, not null"),
    ("final", {"consensus": h("c")}, "final body: 'files' is missing"),
    ("final", {"files": {"a.bin": 3}}, "final body: 'files[\"a.bin\"]' must be a string, not an integer"),
])
def test_a_malformed_body_names_its_field(kind: str, body: object, message: str) -> None:
    with pytest.raises(BodyError) as info:
        parse_body(kind, body)
    assert str(info.value).startswith(message), str(info.value)
    assert isinstance(info.value, ValueError)


def test_the_writer_refuses_a_body_the_reader_would(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "peer-0000.sqlite"
    with pytest.raises(LedgerError, match="block 0: genesis body: 'run_id' is missing"):
        Ledger.create(path, 0, key, {"nonce": "00"})
    assert not path.exists()
    with Ledger.create(path, 0, key, replace(GENESIS, peer=0)) as led:
        with pytest.raises(LedgerError, match="'adapter_sha256' must be 64 lower-case hex digits"):
            led.append_round(1, [], [], [], "A" * 64)
        with pytest.raises(LedgerError, match=r"'rejected\[0\].sender' must be an integer"):
            led.append_round(1, [], [Rejection("1", 0, "norm", "")], [], h("a"))  # type: ignore[arg-type]
        with pytest.raises(LedgerError, match=r"a final block needs 'files'.*'files\[\"x\"\]' must be 64"):
            led.append_final({"files": {"x": "not a digest"}})
        assert led.last_round == 0 and len(led.blocks()) == 1  # nothing refused was written
        led.append_final(FinalBody({}))
        assert led.finalised


# ----------------------------------------------------------------------------------- the audit
def _run_whose_round_2_body_is(tmp_path: Path, body: dict) -> Path:
    """A ring run whose peer 0 signs a round-2 block with ``body`` (validly: the ledger's own
    signing path, so only the schema can object); the other peers' round 2 is empty."""
    run = build_run(tmp_path / "run", rounds=range(1, 2), final=False)
    for p in range(PEERS):
        with Ledger.open(ledger_path(run.path, p), run.keys[p]) as led:
            if p == 0:
                led._append("round", 2, body)
            else:
                led.append_round(2, [], [], [], h(f"adapter {p}"))
    return run.path


EMPTY_ROUND_2 = RoundBody(2, merkle_root([]).hex(), 0, (), (), h("adapter 0")).to_body()


@pytest.mark.parametrize(("body", "field"), [
    ({k: v for k, v in EMPTY_ROUND_2.items() if k != "adapter_sha256"}, "'adapter_sha256' is missing"),
    ({**EMPTY_ROUND_2, "accepted": "0"}, "'accepted' must be an integer, not a string"),
    ({**EMPTY_ROUND_2, "sent": [{"step": 0, "payload": h("x")}]}, "'sent[0].payload_sha256' is missing"),
], ids=["missing", "mistyped", "nested"])
def test_a_signed_round_block_with_a_malformed_body_is_one_problem(tmp_path: Path, body: dict, field: str) -> None:
    run_dir = _run_whose_round_2_body_is(tmp_path, body)
    assert verify_run(run_dir).lines() == [f"ledger/peer-0000.sqlite: peer 0 block 2 (round 2): round body: {field}"]
    assert verify_run(_run_whose_round_2_body_is(tmp_path / "ok", EMPTY_ROUND_2)).ok  # the same run, well-formed


def test_an_edited_body_missing_a_field_is_named_besides_the_broken_hash(tmp_path: Path) -> None:
    run = build_run(tmp_path / "run")
    with sqlite3.connect(ledger_path(run.path, 2)) as conn:
        conn.execute("UPDATE blocks SET body = json_remove(body, '$.merkle_root') WHERE idx = 1")
    conn.close()
    lines = [line for line in verify_run(run.path).lines() if line.startswith("ledger/peer-0002.sqlite: peer 2 block 1 ")]
    assert "hash" in lines[0] and "does not match its contents" in lines[0]
    assert lines[1:] == ["ledger/peer-0002.sqlite: peer 2 block 1 (round 1): round body: 'merkle_root' is missing"]
    with pytest.raises(AuditError, match=r"peer 2 block 1 \(round 1\): round body: 'merkle_root' is missing"):
        inclusion(run.path, 1, 1)  # peer 2 holds peer 1's round-1 envelopes


def test_a_final_body_without_files_is_named(tmp_path: Path) -> None:
    run = build_run(tmp_path / "run", final=False)
    for p in range(PEERS):
        with Ledger.open(ledger_path(run.path, p), run.keys[p]) as led:
            led._append("final", 2, {"files": []} if p == 3 else {"files": {}})
    assert verify_run(run.path).lines() == [
        "ledger/peer-0003.sqlite: peer 3 block 3 (final): final body: 'files' must be an object, not an array"]


# ------------------------------------------------------------------------ the rejection summary
def test_one_rejection_summary_from_counts_and_from_records() -> None:
    records = [(0, Rejection(1, 0, "nonfinite", "")), (2, Rejection(1, 1, "nonfinite", "")),
               (0, Rejection(3, 0, "signature", "")), (2, Rejection(1, 0, "norm", ""))]
    counts = torch.zeros(4, 4, len(CHECKS), dtype=torch.float64)  # (receivers, senders, checks)
    for receiver, r in records:
        counts[receiver, r.sender, CHECKS.index(r.check)] += 1
    expected = {"1": {"nonfinite": 2, "norm": 1}, "3": {"signature": 1}}
    assert run_rejection_summary(counts) == rejection_summary(records) == expected
    assert rejected_by_sender([(10, "a", 1), (2, "b", 0), (5, "b", 0), (10, "a", 1)]) == {"10": {"a": 2}}  # no zeros
    assert list(rejected_by_sender([(10, "a", 1), (2, "a", 1)])) == ["2", "10"]  # numeric, not string, order
    assert run_rejection_summary(torch.zeros(2, 2, len(CHECKS))) == {} == rejection_summary([])
