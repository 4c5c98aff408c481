"""summary.json as a typed RunSummary: it reads and writes back every real summary unchanged, a bad
file is one line naming the file and the key, and the committed run reports come out byte for byte
from their summary.json and metrics.jsonl (the report read the plain dict when they were written).

The real summaries are the committed run folders under experiments/: written by ``d2ora simulate``
and ``d2ora compare`` over the project's history, so they include files from before keys such as
``robust`` or ``share`` existed, trust runs, and a key added by another tool (``ledger_verify``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from d2ora import atomic
from d2ora.recipes.compare import is_finished, method_config
from d2ora.report.csv_files import SUMMARY_CSV_COLUMNS
from d2ora.report.markdown import SETUP_KEYS, run_markdown
from d2ora.report.model import RunSummary, SummaryError, TrustSummary
from tests.test_compare_seeds import DECAF_ACCS, fake_finished_run, tiny_config

REPO = Path(__file__).resolve().parents[1]
REAL = sorted((REPO / "experiments").rglob("summary.json"))


def rows_of(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]


def hand_built() -> RunSummary:
    """Every kind of key: required, optional, the d2ora-peer ones, a trust section and an unknown one."""
    final = {"round": 2, "consensus_test": {"accuracy": 0.5, "loss": 1.0, "examples": 12}, "bytes_sent_total": 96}
    return RunSummary.model_validate({
        "name": "decaf", "mixer": "decaf", "robust": "none", "byzantine": [], "method": "dora", "r": 2,
        "metric": "accuracy", "higher_is_better": True, "peers": 2, "spectral_gap": 1.0,
        "label_names": ["a", "b"], "label_counts": [[1, 2], [3, 0]], "final": final, "runtime_s": 1.5,
        "adapters": ["adapters/peer-0", "adapters/peer-1"], "consensus_adapter": "consensus/adapter",
        "merged_model": None, "wire_dtype": "native", "processes": 2, "backend": "gloo",
        "trust": {"mode": "simulated", "ledger": "ledger", "run_id": "ab" * 32, "rejected_total": 4,
                  "rejected_by_sender": {"1": {"signature": 4}}, "seconds": {"sign": 0.01, "verify": 0.2}},
        "ledger_verify": {"ok": True},
    })


# ---------------------------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------------------------


def test_real_summaries_round_trip_unchanged(tmp_path: Path) -> None:
    assert len(REAL) > 100, "the committed run folders under experiments/ are the reference"
    for path in REAL:
        data = json.loads(path.read_text(encoding="utf-8"))
        summary = RunSummary.read(path)
        assert summary.to_dict() == data, path
        assert list(summary.to_dict()) == list(data), path  # same keys, same order: none added
        copy = summary.write(tmp_path / "summary.json")
        assert RunSummary.read(copy) == summary, path
        assert json.loads(copy.read_text(encoding="utf-8")) == data, path


def test_hand_built_summary_round_trips_with_trust_and_unknown_keys(tmp_path: Path) -> None:
    summary = hand_built()
    assert isinstance(summary.trust, TrustSummary) and summary.trust.rejected_by_sender == {"1": {"signature": 4}}
    assert summary.model_extra == {"ledger_verify": {"ok": True}}  # kept, not dropped
    back = RunSummary.read(summary.write(tmp_path / "summary.json"))
    assert back == summary
    text = (tmp_path / "summary.json").read_text(encoding="utf-8")
    assert text == json.dumps(summary.to_dict(), indent=2) + "\n"  # as atomic.write_json always wrote it
    keys = list(json.loads(text))
    assert keys[-4:] == ["processes", "backend", "trust", "ledger_verify"]
    assert "share" not in keys and "task" not in keys  # a key it was not given stays out of the file


def test_a_plain_run_writes_no_trust_or_process_keys() -> None:
    data = hand_built().to_dict()
    for key in ("processes", "backend", "trust", "ledger_verify"):
        del data[key]
    assert list(RunSummary.model_validate(data).to_dict()) == list(data)


# ---------------------------------------------------------------------------------------------
# Bad files: one line naming the file and the key
# ---------------------------------------------------------------------------------------------


def write_changed(tmp_path: Path, change) -> Path:
    data = hand_built().to_dict()
    change(data)
    return atomic.write_json(tmp_path / "summary.json", data)


def one_line_error(path: Path) -> str:
    with pytest.raises(SummaryError) as caught:
        RunSummary.read(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    return message


@pytest.mark.parametrize(("change", "expected"), [
    (lambda d: d.pop("final"), "missing key 'final'"),
    (lambda d: (d.pop("name"), d.pop("metric")), "missing keys 'name', 'metric'"),
    (lambda d: d["trust"].pop("run_id"), "missing key 'trust.run_id'"),
    (lambda d: d.update(peers="four"), "bad value for key 'peers': "),
    (lambda d: d.update(label_counts=[[1, 2], [3, "x"]]), "bad value for key 'label_counts[1][1]': "),
    (lambda d: d["trust"].update(rejected_by_sender={"1": {"signature": "many"}}),
     "bad value for key 'trust.rejected_by_sender.1.signature': "),
])
def test_a_bad_summary_is_one_line_naming_the_key(tmp_path: Path, change, expected: str) -> None:
    assert expected in one_line_error(write_changed(tmp_path, change))


def test_not_json_or_not_an_object_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    path.write_text('{"name": "decaf",', encoding="utf-8")  # cut off mid-write by something else
    assert "not JSON" in one_line_error(path)
    path.write_text("[1, 2]", encoding="utf-8")
    assert "expected a JSON object, got list" in one_line_error(path)
    path.write_bytes(b'{"name": "\xff"}')
    assert "not UTF-8" in one_line_error(path)


def test_an_invalid_summary_is_no_finished_run(tmp_path: Path) -> None:
    """d2ora compare runs (mixer, seed) again rather than report a summary.json it cannot read."""
    config = method_config(tiny_config(tmp_path, rounds=4), "decaf", 0, tmp_path / "decaf")
    fake_finished_run(config, DECAF_ACCS[0])
    assert is_finished(config, tmp_path / "decaf")
    summary = json.loads((tmp_path / "decaf" / "summary.json").read_text(encoding="utf-8"))
    atomic.write_json(tmp_path / "decaf" / "summary.json", {**summary, "rounds": "four"})
    assert not is_finished(config, tmp_path / "decaf")


# ---------------------------------------------------------------------------------------------
# The report reads the typed summary
# ---------------------------------------------------------------------------------------------


def test_keys_the_report_names_are_summary_fields() -> None:
    # The compare report and compare.csv read these by name: a renamed field must fail here.
    assert set(SETUP_KEYS) <= set(RunSummary.model_fields)
    assert set(SUMMARY_CSV_COLUMNS) <= set(RunSummary.model_fields)


def test_committed_run_reports_come_out_byte_for_byte() -> None:
    """Each committed report.md was written at the end of its run, from the summary as a plain dict;
    the typed summary read back from summary.json must give the same bytes."""
    folders = [p.parent for p in REAL if (p.parent / "report.md").is_file()]
    assert len(folders) > 100
    differing = [str(folder.relative_to(REPO)) for folder in folders
                 if run_markdown(folder, RunSummary.read(folder / "summary.json"), rows_of(folder))
                 != (folder / "report.md").read_text(encoding="utf-8")]
    assert differing == []
