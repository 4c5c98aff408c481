"""What a report is made of: a run's summary.json as typed classes, and the final numbers of a run
and of a method over its seeds.

:class:`RunSummary` keeps every key of summary.json under its own name and JSON shape, in the order
the file has always had, so tools (and older report code) that read the file as a plain dict keep
working. Keys unknown to this version (``ledger_verify``, added by experiments/run_byzantine.py,
or a newer version's) are kept as they are and written back.

Which keys a file must have: only those a reader cannot do without (``name``, ``mixer``,
``metric``, ``final``). summary.json gained keys over time (``robust``, ``share``, ``drift`` ...
from December 2026 on), and ``d2ora compare`` must still read a finished run written before them.
Every key that is there is type-checked. :meth:`RunSummary.read` turns a bad file into one line
naming the file and the key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from d2ora import atomic

if TYPE_CHECKING:  # stats imports rows, which imports this module: the type only, not at run time
    from d2ora.report.stats import Spread


class SummaryError(ValueError):
    """A summary.json that cannot be read: one line naming the file and the key (or the JSON error)."""


class TrustSummary(BaseModel):
    """summary.json's ``trust`` section (trust runs only): the ledgers, the rejected messages per
    sender and check, and the monitor process's signing, checking and ledger time (seconds)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    mode: str
    ledger: str  # the ledger folder, relative to the run folder
    run_id: str  # hex of the run nonce
    rejected_total: int
    rejected_by_sender: dict[str, dict[str, int]]  # sender id (a string: JSON keys are) -> check -> count
    seconds: dict[str, float]


class AnswerSample(BaseModel):
    """One test prompt of an ``sft`` run with the reference answer and the greedy answers of the base
    model, the consensus model and peer 0 (None where that model could not be run)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    prompt: str
    reference: str
    base: str | None = None
    consensus: str | None = None
    peer0: str | None = None


class RunSummary(BaseModel):
    """One run's summary.json. Fields are in the file's key order (the order they are written in).

    A key with a default may be missing (an older file, or a hand-built summary handed to the
    report): it reads as None. ``name``, ``mixer``, ``metric`` and ``final`` must be there.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    mixer: str | None  # "centralized" for the centralized run mode
    robust: str | None = None
    share: str | None = None
    drift: str | None = None
    prox_mu: float | None = None
    logit_adjust: float | None = None
    attack: str | None = None
    byzantine: list[int] | None = None
    method: str | None = None
    r: int | None = None
    model: str | None = None
    task: str | None = None
    metric: str | None  # the key of each evaluation that is the score ("accuracy", "perplexity")
    higher_is_better: bool | None = None  # None: as for the metric (accuracy higher, others lower)
    peers: int | None = None
    topology: str | None = None
    spectral_gap: float | None = None
    partition: str | None = None
    rounds: int | None = None
    local_steps: int | None = None
    mixing_steps: int | None = None
    batch_size: int | None = None
    label_names: list[str] | None = None
    label_counts: list[list[int]] | None = None  # per peer, per label
    # The last metrics.jsonl row, as it is there: the rows have their own (open) schema.
    final: dict[str, Any] | None
    runtime_s: float | None = None
    adapters: list[str] | None = None  # folders relative to the run folder
    consensus_adapter: str | None = None
    merged_model: str | None = None
    trainable_params_per_peer: int | None = None
    message_bytes: int | None = None
    wire_dtype: str | None = None
    processes: int | None = None  # d2ora peer only
    backend: str | None = None  # d2ora peer only
    trust: TrustSummary | None = None  # trust runs only
    samples: list[AnswerSample] | None = None  # sft runs only: a few generated answers side by side
    peak_memory_mb: list[float] | None = None  # per process, in rank order (one entry for simulate)
    peak_memory_kind: str | None = None  # "cpu_rss" or "cuda_allocated" (d2ora.engine.memory)

    @classmethod
    def read(cls, path: str | Path) -> RunSummary:
        """The summary in ``path``; :class:`SummaryError` (one line: the file, then the key) when it
        is not JSON, not an object, lacks a key that must be there or has a value of the wrong type.
        An unreadable file raises the OSError as it is."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise SummaryError(f"{path}: not UTF-8 text ({exc.reason})") from None
        except json.JSONDecodeError as exc:
            raise SummaryError(f"{path}: not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise SummaryError(f"{path}: expected a JSON object, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise SummaryError(f"{path}: {_first_problem(exc)}") from None

    def write(self, path: str | Path) -> Path:
        """Write summary.json atomically (a reader sees the old file or the new one)."""
        return atomic.write_json(path, self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, as plain Python values. Only keys the summary was given: ``trust`` and
        ``processes`` stay out of a run without them, as they always have."""
        return self.model_dump(mode="python", exclude_unset=True)

    @classmethod
    def coerce(cls, summary: SummaryInput) -> RunSummary:
        """A summary as the report's public functions accept it: a RunSummary, or a plain dict as
        loaded from JSON or built by hand, where any key may be missing (a missing ``name`` reads
        as "run", the others as None). A value of the wrong type is still a ValidationError."""
        if isinstance(summary, RunSummary):
            return summary
        return cls.model_validate({**_ABSENT_REQUIRED, **summary})


#: What the report's functions take for a summary (see :meth:`RunSummary.coerce`).
SummaryInput = RunSummary | Mapping[str, Any]

# What a missing required key reads as when a hand-built summary goes to the report.
_ABSENT_REQUIRED: dict[str, Any] = {"name": "run", "mixer": None, "metric": None, "final": None}


def _first_problem(exc: ValidationError) -> str:
    """One line for a failed validation: every missing key, else the first bad value and why."""
    errors = exc.errors(include_url=False)
    missing = [_key(e["loc"]) for e in errors if e["type"] == "missing"]
    if missing:
        return f"missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
    first = errors[0]
    return f"bad value for key {_key(first['loc'])}: {first['msg']}"


def _key(loc: tuple[int | str, ...]) -> str:
    # ("trust", "run_id") -> 'trust.run_id'; list positions as [i]: ("label_counts", 2, 0) -> 'label_counts[2][0]'
    text = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    return f"'{text}'"


# ----------------------------------------------------------------------------------- final numbers


@dataclass(frozen=True)
class RunFinal:
    """One run's final numbers, as the comparison shows them (raw values, not formatted)."""

    name: str
    consensus: float | None
    mean_peer: float | None
    worst_peer: float | None
    own_split: float | None  # mean peer on its own held-out split (the personalized view)
    distances: dict[str, float | None]
    bytes_sent_total: int | None
    samples_seen: int | None
    rounds: int | None
    runtime_s: float | None
    # An sft run's greedy-answer accuracy beside its headline perplexity (None for other tasks).
    consensus_generative: float | None = None
    mean_peer_generative: float | None = None


@dataclass(frozen=True)
class MethodFinal:
    """One method's final numbers over its seeds, each as mean and sample std (ddof = 1)."""

    name: str
    runs: tuple[RunFinal, ...]  # one per seed, in the group's seed order
    consensus: Spread
    mean_peer: Spread
    worst_peer: Spread
    own_split: Spread
    distances: dict[str, Spread]
    bytes_sent_total: Spread
    samples_seen: Spread
    runtime_s: Spread
    consensus_generative: Spread
    mean_peer_generative: Spread
