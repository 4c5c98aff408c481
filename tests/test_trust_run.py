"""The trust layer in a real run (MiniLM + BBC News, tiny budget): signing changes nothing about the
result, attacks are rejected or caught, and `d2ora ledger verify` checks the run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from d2ora.cli import app
from d2ora.recipes.simulate import simulate
from d2ora.trust.audit import verify_run
from d2ora.trust.ledger import Ledger
from tests.conftest import crash_at_local_step
from tests.test_simulate import tiny_config

FAST = {"save_merged": False, "tensorboard": False, "eval_peers": False}


def peer_tensors(out: Path, peer: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapters" / f"peer-{peer}" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def signed_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("signed")
    return out, simulate(tiny_config(out, mixer="decaf", trust="simulated", **FAST))


def test_signing_changes_nothing_and_the_run_verifies(signed_run, tmp_path: Path) -> None:
    out, summary = signed_run
    plain = simulate(tiny_config(tmp_path, mixer="decaf", **FAST))
    for peer in range(4):
        signed, unsigned = peer_tensors(out, peer), peer_tensors(tmp_path, peer)
        assert signed.keys() == unsigned.keys()
        assert all(torch.equal(signed[k], unsigned[k]) for k in signed)
    assert summary["final"]["consensus_test"] == plain["final"]["consensus_test"]
    assert summary["trust"]["rejected_total"] == 0
    report = verify_run(out)
    assert report.ok, report.lines()
    result = CliRunner().invoke(app, ["ledger", "verify", str(out)])
    assert result.exit_code == 0, result.output
    # one genesis, one block per round and a final block per peer; ring of 4: 2 envelopes a round
    ledger = Ledger.open(out / "ledger" / "peer-0002.sqlite")
    kinds = [b.kind for b in ledger.blocks()]
    assert kinds == ["genesis", "round", "round", "final"]
    assert len(ledger.envelopes(1)) == 2
    final = ledger.blocks()[-1].body["files"]
    assert "adapters/peer-2/adapter_model.safetensors" in final
    ledger.close()
    assert not (out / "ledger" / "peer-0000.key").exists() and not list(out.rglob("*.key"))  # no private key saved


def test_an_edited_adapter_byte_fails_verification_naming_the_file(signed_run, tmp_path: Path) -> None:
    out, _ = signed_run
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    target = copy / "adapters" / "peer-1" / "adapter_model.safetensors"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x01
    target.write_bytes(bytes(data))
    result = CliRunner().invoke(app, ["ledger", "verify", str(copy)])
    assert result.exit_code == 1
    assert "adapters/peer-1/adapter_model.safetensors" in result.output


def test_nan_attack_is_rejected_every_time_and_honest_peers_stay_finite(tmp_path: Path) -> None:
    from rich.console import Console

    console = Console(record=True, width=240)
    summary = simulate(tiny_config(tmp_path, mixer="d2ora", trust="simulated", attack="nan", byzantine=[1], **FAST),
                       console=console)
    # peer 1 on a ring of 4 sends to 2 neighbours per round, 2 rounds: 4 messages, all rejected
    assert summary["trust"]["rejected_by_sender"] == {"1": {"nonfinite": 4}}
    assert "round 2 step 0: peer 0 rejected peer 1's message (nonfinite:" in console.export_text()
    for peer in (0, 2, 3):
        assert all(torch.isfinite(t).all() for t in peer_tensors(tmp_path, peer).values())
    report = verify_run(tmp_path)
    assert report.ok, report.lines()
    ledger = Ledger.open(tmp_path / "ledger" / "peer-0000.sqlite")
    [rejection] = ledger.rejections(1)
    assert rejection.sender == 1 and rejection.check == "nonfinite"
    ledger.close()


def test_equivocation_is_named_by_the_audit(tmp_path: Path) -> None:
    summary = simulate(tiny_config(tmp_path, mixer="d2ora", trust="simulated", attack="equivocation", byzantine=[3],
                                   rounds=1, **FAST))
    assert summary["trust"]["rejected_total"] == 0  # each receiver alone sees a valid message
    report = verify_run(tmp_path)
    assert not report.ok
    assert any("peer 3" in line and "equivoc" in line for line in report.lines()), report.lines()


def test_robust_rule_and_model_attack_run_and_record_honest_consensus(tmp_path: Path) -> None:
    summary = simulate(tiny_config(tmp_path, mixer="d2ora", trust="simulated", attack="ipm", byzantine=[2],
                                   robust="self_centered_clipping", rounds=1, **FAST))
    assert summary["name"] == "d2ora+self_centered_clipping" and summary["byzantine"] == [2]
    assert summary["trust"]["rejected_total"] == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["consensus_test"]["accuracy"] >= 0


def test_bad_trust_configs_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    cases = [
        (["--set", "trust.attack=alie"], "needs byzantine peers"),
        (["--set", "trust.attack=alie", "--set", "trust.byzantine=[1]"], "set trust.mode: simulated"),
        (["--set", "trust.mode=keys"], "needs trust.roster"),
        (["--set", "trust.robust=krum"], "k=3 (ring) tolerates at most f=0"),
        (["--set", "trust.robust=median", "--set", "network.mixer=decaf"], "coordinate-wise"),
        (["--set", "trust.attack=bogus", "--set", "trust.byzantine=[1]"], "unknown attack"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["simulate", "--set", f"run.output_dir={tmp_path}", "--set", "network.peers=4", *args])
        assert result.exit_code != 0, args
        assert message in result.output, (args, result.output)


def test_a_resumed_signed_run_rewinds_its_ledgers_and_still_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """trust: keys, checkpoints every 2 rounds, a crash in round 4: the ledgers hold round 3, which
    the checkpoint does not; resume moves it to `abandoned`, signs rounds 3 and 4 again, and the
    run verifies against the roster and ends with an uninterrupted run's adapters."""
    import yaml

    from d2ora.trust.identity import public_key_string, write_private_key

    keys = tmp_path / "keys"
    roster = {"peers": {str(p): public_key_string(write_private_key(keys / f"peer-{p}.key")) for p in range(4)}}
    (tmp_path / "roster.yaml").write_text(yaml.safe_dump(roster))
    signed = {"trust": "keys", "roster": tmp_path / "roster.yaml", "keys_dir": keys, "rounds": 4, "checkpoint_every": 2,
              "mixer": "d2ora", **FAST}
    reference = tmp_path / "reference"
    simulate(tiny_config(reference, **signed))
    crash_at_local_step(monkeypatch, 3 * 2 + 1)  # first local step of round 4
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="power cut"):
        simulate(tiny_config(out, **signed))
    monkeypatch.undo()
    with Ledger.open(out / "ledger" / "peer-0001.sqlite") as ledger:
        assert ledger.last_round == 3
    simulate(tiny_config(out, **signed), resume=True)
    with Ledger.open(out / "ledger" / "peer-0001.sqlite") as ledger:
        assert [b.round for b in ledger.blocks() if b.kind == "round"] == [1, 2, 3, 4]
        assert len(ledger.abandoned()) == 1
    from d2ora.trust.identity import load_roster

    report = verify_run(out, load_roster(tmp_path / "roster.yaml"))
    assert report.ok and report.abandoned == 4, report.lines()
    for peer in range(4):
        ours, theirs = peer_tensors(out, peer), peer_tensors(reference, peer)
        assert all(torch.allclose(ours[k], theirs[k], rtol=0, atol=1e-6) for k in ours)
    # a simulated-trust run cannot be resumed: its keys are gone
    with pytest.raises(Exception, match="throwaway keys"):
        simulate(tiny_config(tmp_path / "sim", trust="simulated", rounds=1, **FAST))
        simulate(tiny_config(tmp_path / "sim", trust="simulated", rounds=1, **FAST), resume=True)


def test_saved_file_digests_work_from_a_relative_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """output_dir is often relative (runs/simulate): the final block names files relative to it."""
    import hashlib

    from d2ora.recipes.trust_run import folder_digests

    monkeypatch.chdir(tmp_path)
    target = Path("runs/x/adapters/peer-0/adapter_model.safetensors")
    target.parent.mkdir(parents=True)
    target.write_bytes(b"weights")
    assert folder_digests(Path("runs/x"), ["adapters/peer-0", "consensus"]) == {
        "adapters/peer-0/adapter_model.safetensors": hashlib.sha256(b"weights").hexdigest()}


def test_label_flip_peers_train_on_flipped_copies_and_the_rest_is_unchanged(tmp_path: Path) -> None:
    """Data poisoning: the Byzantine peer's label table is its own shard's, reversed (y -> C-1-y);
    every honest peer's shard is the same as without the attack."""
    clean = simulate(tiny_config(tmp_path / "clean", rounds=1, local_steps=1, eval_peers=False, save_merged=False,
                                 save_adapters=False, tensorboard=False))
    poisoned = simulate(tiny_config(tmp_path / "poisoned", rounds=1, local_steps=1, eval_peers=False, save_merged=False,
                                    save_adapters=False, tensorboard=False, attack="label_flip", byzantine=[1]))
    before, after = clean["label_counts"], poisoned["label_counts"]
    assert after[1] == before[1][::-1] and before[1] != before[1][::-1]
    assert [row for k, row in enumerate(after) if k != 1] == [row for k, row in enumerate(before) if k != 1]


def test_a_resumed_attack_run_continues_like_the_uninterrupted_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trust run's state outlives a crash: a replaying Byzantine peer resends its previous
    step's message, so after a resume it must still hold the one from before the checkpoint, and
    the rejection counts in summary.json cover the whole run, not only its resumed part."""
    import yaml

    from d2ora.trust.identity import load_roster, public_key_string, write_private_key

    keys = tmp_path / "keys"
    roster = {"peers": {str(p): public_key_string(write_private_key(keys / f"peer-{p}.key")) for p in range(4)}}
    (tmp_path / "roster.yaml").write_text(yaml.safe_dump(roster))
    signed = {"trust": "keys", "roster": tmp_path / "roster.yaml", "keys_dir": keys, "rounds": 3, "checkpoint_every": 2,
              "mixer": "d2ora", "attack": "replay", "byzantine": [1], **FAST}
    reference = simulate(tiny_config(tmp_path / "reference", **signed))
    assert reference["trust"]["rejected_by_sender"] == {"1": {"replay": 4}}  # rounds 2 and 3, two neighbours each
    crash_at_local_step(monkeypatch, 2 * 2 + 1)  # first local step of round 3, after round 2's checkpoint
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="power cut"):
        simulate(tiny_config(out, **signed))
    monkeypatch.undo()
    resumed = simulate(tiny_config(out, **signed), resume=True)
    assert resumed["trust"]["rejected_by_sender"] == reference["trust"]["rejected_by_sender"]
    assert resumed["final"]["consensus_test"] == reference["final"]["consensus_test"]
    for peer in range(4):
        ours, theirs = peer_tensors(out, peer), peer_tensors(tmp_path / "reference", peer)
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    report = verify_run(out, load_roster(tmp_path / "roster.yaml"))
    assert report.ok, report.lines()
