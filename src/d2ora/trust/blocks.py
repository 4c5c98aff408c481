"""The bodies of the three ledger block kinds: the one place their JSON schema is written down.

A block's ``body`` is the JSON object its hash and signature cover (see :mod:`d2ora.trust.ledger`).
The ledger writes bodies only as ``XBody(...).to_body()`` and the auditor reads them only through
``XBody.from_body(raw)``, so writer and reader cannot drift apart. ``to_body`` returns exactly the
dict the ledger has always written: the block hash is taken over its canonical JSON, so a renamed
or reshaped field would make every existing ledger fail to verify.

The constructors (and so ``from_body``) check the shape: every field present, none unknown (except
in the open ``extra`` part of a genesis or final body), JSON types right (a boolean is not an
integer), digests in lower-case hex. What the values mean (a Merkle root matching the stored
envelopes, a file matching its digest) is the auditor's to check. A violation raises
:class:`BodyError`, a ``ValueError`` naming the kind and the field, e.g.
``round body: 'adapter_sha256' is missing`` or ``round body: 'rejected[1].step' must be an integer, not a string``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"(?:[0-9a-f]{2})+")
_JSON_NAMES: dict[type, str] = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
                                list: "an array", tuple: "an array", dict: "an object", type(None): "null"}


class BodyError(ValueError):
    """A block body that does not have its kind's schema; ``field`` names the offending field
    (``""`` when the body as a whole is wrong)."""

    def __init__(self, kind: str, field: str, problem: str) -> None:
        super().__init__(f"{kind} body: '{field}' {problem}" if field else f"{kind} body {problem}")
        self.kind, self.field, self.problem = kind, field, problem

    def inside(self, kind: str, prefix: str) -> BodyError:
        """The same error reported from the body that holds this record: ``rejected[1].step``."""
        return BodyError(kind, f"{prefix}.{self.field}" if self.field else prefix, self.problem)


def is_sha256_hex(value: object) -> bool:
    """64 lower-case hex digits: how every SHA-256 in a ledger is written."""
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def _json_name(value: object) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _check(kind: str, name: str, value: object, want: type, *, nullable: bool = False, sha256: bool = False) -> None:
    if nullable and value is None:
        return
    # bool is an int subclass in Python but another JSON type: `true` is no round number
    if not isinstance(value, want) or (isinstance(value, bool) and want is not bool):
        expected = _JSON_NAMES[want] + (" or null" if nullable else "")
        raise BodyError(kind, name, f"must be {expected}, not {_json_name(value)}")
    if sha256 and not is_sha256_hex(value):
        raise BodyError(kind, name, "must be 64 lower-case hex digits (a SHA-256)")


def _fields(kind: str, body: object, required: tuple[str, ...], optional: tuple[str, ...] = (),
            open_: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """(known fields, other fields) of ``body``, after checking it is an object that holds every
    required field and, unless ``open_``, nothing else. Types are the dataclass's to check."""
    if not isinstance(body, Mapping):
        raise BodyError(kind, "", f"must be an object, not {_json_name(body)}")
    for name in required:
        if name not in body:
            raise BodyError(kind, name, "is missing")
    known = required + optional
    other = {k: v for k, v in body.items() if k not in known}
    if other and not open_:
        raise BodyError(kind, min(map(str, other)), f"is not a field of a {kind} body")
    return {k: body[k] for k in known if k in body}, other


def array_of(kind: str, name: str, value: object, parse: Callable[[Any], Any]) -> tuple[Any, ...]:
    """The array field ``name`` of a ``kind`` body, each element made by ``parse``: a BodyError of
    element i is re-raised naming ``name[i].field``, so the message says which record is wrong."""
    if not isinstance(value, list | tuple):
        raise BodyError(kind, name, f"must be an array, not {_json_name(value)}")
    out = []
    for i, item in enumerate(value):
        try:
            out.append(parse(item))
        except BodyError as exc:
            raise exc.inside(kind, f"{name}[{i}]") from None
    return tuple(out)


def _open_part(kind: str, extra: Mapping[str, Any], reserved: tuple[str, ...]) -> None:
    for key in extra:
        if not isinstance(key, str):
            raise BodyError(kind, str(key), "is not a string key")
        if key in reserved:
            raise BodyError(kind, key, "is a fixed field, not an extra one")


# ------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class RejectedRecord:
    """One entry of a round body's ``rejected``: a refused message, and the SHA-256 of its raw bytes
    (null when nothing arrived, e.g. a timeout)."""

    sender: int
    step: int
    check: str
    detail: str
    envelope_sha256: str | None

    def __post_init__(self) -> None:
        for name, want in (("sender", int), ("step", int), ("check", str), ("detail", str)):
            _check("rejected record", name, getattr(self, name), want)
        _check("rejected record", "envelope_sha256", self.envelope_sha256, str, nullable=True, sha256=True)

    def to_body(self) -> dict[str, Any]:
        return {"sender": self.sender, "step": self.step, "check": self.check, "detail": self.detail,
                "envelope_sha256": self.envelope_sha256}

    @classmethod
    def from_body(cls, body: object) -> Self:
        known, _ = _fields("rejected record", body, ("sender", "step", "check", "detail", "envelope_sha256"))
        return cls(**known)


@dataclass(frozen=True)
class SentRecord:
    """One entry of a round body's ``sent``: the SHA-256 of the payload sent in one gossip step."""

    step: int
    payload_sha256: str

    def __post_init__(self) -> None:
        _check("sent record", "step", self.step, int)
        _check("sent record", "payload_sha256", self.payload_sha256, str, sha256=True)

    def to_body(self) -> dict[str, Any]:
        return {"step": self.step, "payload_sha256": self.payload_sha256}

    @classmethod
    def from_body(cls, body: object) -> Self:
        known, _ = _fields("sent record", body, ("step", "payload_sha256"))
        return cls(**known)


@dataclass(frozen=True)
class RejoinRecord:
    """A round body's optional ``rejoined``: this peer left the run after round ``missed_from - 1``
    (its last checkpoint), missed rounds ``missed_from..missed_to`` (none when ``missed_to <
    missed_from``) and came back in this block's round, which it did not train: its adapter became
    its neighbours' messages of this round, mixed without its own (``detail`` says so in words)."""

    missed_from: int
    missed_to: int
    detail: str

    def __post_init__(self) -> None:
        for name, want in (("missed_from", int), ("missed_to", int), ("detail", str)):
            _check("rejoined record", name, getattr(self, name), want)
        if self.missed_from < 1 or self.missed_to < self.missed_from - 1:
            raise BodyError("rejoined record", "missed_to",
                            f"must be at least missed_from - 1 (missed_from {self.missed_from}, missed_to {self.missed_to})")

    @property
    def missed(self) -> range:
        return range(self.missed_from, self.missed_to + 1)

    def to_body(self) -> dict[str, Any]:
        return {"missed_from": self.missed_from, "missed_to": self.missed_to, "detail": self.detail}

    @classmethod
    def from_body(cls, body: object) -> Self:
        known, _ = _fields("rejoined record", body, ("missed_from", "missed_to", "detail"))
        return cls(**known)


# ------------------------------------------------------------------------------------- bodies
_GENESIS_REQUIRED = ("peer", "run_id", "nonce", "config_sha256", "roster_sha256", "layout_sha256")


@dataclass(frozen=True)
class GenesisBody:
    """Block 0: who keeps the ledger and which run it belongs to. ``run_id`` is bound to ``nonce``
    and the three digests (:func:`d2ora.trust.envelope.run_identity`); ``in_neighbours``, when
    present, lists the only peers this one may accept messages from. ``extra``: any further fields
    the caller recorded (kept, hashed and signed, not interpreted)."""

    peer: int
    run_id: str
    nonce: str
    config_sha256: str
    roster_sha256: str
    layout_sha256: str
    in_neighbours: tuple[int, ...] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check("genesis", "peer", self.peer, int)
        for name in ("run_id", "config_sha256", "roster_sha256", "layout_sha256"):
            _check("genesis", name, getattr(self, name), str, sha256=True)
        _check("genesis", "nonce", self.nonce, str)
        if not _HEX.fullmatch(self.nonce):
            raise BodyError("genesis", "nonce", "must be lower-case hex bytes")
        if self.in_neighbours is not None:
            neighbours = array_of("genesis", "in_neighbours", self.in_neighbours, lambda n: n)
            for i, n in enumerate(neighbours):
                _check("genesis", f"in_neighbours[{i}]", n, int)
            object.__setattr__(self, "in_neighbours", neighbours)  # a list given becomes the tuple stored
        _open_part("genesis", self.extra, _GENESIS_REQUIRED + ("in_neighbours",))

    def to_body(self) -> dict[str, Any]:
        body = {**self.extra, "peer": self.peer, "run_id": self.run_id, "nonce": self.nonce,
                "config_sha256": self.config_sha256, "roster_sha256": self.roster_sha256,
                "layout_sha256": self.layout_sha256}
        if self.in_neighbours is not None:  # optional: absent, not null, when the caller gave none
            body["in_neighbours"] = list(self.in_neighbours)
        return body

    @classmethod
    def from_body(cls, body: object) -> Self:
        known, extra = _fields("genesis", body, _GENESIS_REQUIRED, ("in_neighbours",), open_=True)
        if "in_neighbours" in known and known["in_neighbours"] is None:
            raise BodyError("genesis", "in_neighbours", "must be an array, not null")  # absent, never null
        return cls(**known, extra=extra)


@dataclass(frozen=True)
class RoundBody:
    """One training round: ``merkle_root`` is the RFC 6962 root over the SHA-256 digests of the
    ``accepted`` envelopes (``Envelope.digest``) in their stored order; ``rejected`` the messages
    refused, ``sent`` what this peer sent each gossip step, ``adapter_sha256`` its adapter after
    mixing. ``rejoined`` (optional, absent rather than null) marks the round a peer came back in
    after missing the rounds it names (:class:`RejoinRecord`)."""

    round: int
    merkle_root: str
    accepted: int
    rejected: tuple[RejectedRecord, ...]
    sent: tuple[SentRecord, ...]
    adapter_sha256: str
    rejoined: RejoinRecord | None = None

    def __post_init__(self) -> None:
        _check("round", "round", self.round, int)
        _check("round", "merkle_root", self.merkle_root, str, sha256=True)
        _check("round", "accepted", self.accepted, int)
        _check("round", "adapter_sha256", self.adapter_sha256, str, sha256=True)
        for name, record in (("rejected", RejectedRecord), ("sent", SentRecord)):
            items = array_of("round", name, getattr(self, name), lambda r: r)
            for i, item in enumerate(items):
                if not isinstance(item, record):
                    raise BodyError("round", f"{name}[{i}]", f"must be a {record.__name__}, not {_json_name(item)}")
            object.__setattr__(self, name, items)  # a list given becomes the tuple stored
        if self.rejoined is not None:
            if not isinstance(self.rejoined, RejoinRecord):
                raise BodyError("round", "rejoined", f"must be a RejoinRecord, not {_json_name(self.rejoined)}")
            if self.rejoined.missed_to != self.round - 1:
                raise BodyError("round", "rejoined.missed_to",
                                f"must be the round before this one ({self.round - 1}), not {self.rejoined.missed_to}")

    def to_body(self) -> dict[str, Any]:
        body = {"round": self.round, "merkle_root": self.merkle_root, "accepted": self.accepted,
                "rejected": [r.to_body() for r in self.rejected], "sent": [s.to_body() for s in self.sent],
                "adapter_sha256": self.adapter_sha256}
        if self.rejoined is not None:
            body["rejoined"] = self.rejoined.to_body()
        return body

    @classmethod
    def from_body(cls, body: object) -> Self:
        known, _ = _fields("round", body, ("round", "merkle_root", "accepted", "rejected", "sent", "adapter_sha256"),
                           ("rejoined",))
        known["rejected"] = array_of("round", "rejected", known["rejected"], RejectedRecord.from_body)
        known["sent"] = array_of("round", "sent", known["sent"], SentRecord.from_body)
        if "rejoined" in known:
            try:
                known["rejoined"] = RejoinRecord.from_body(known["rejoined"])
            except BodyError as exc:
                raise exc.inside("round", "rejoined") from None
        return cls(**known)


@dataclass(frozen=True)
class FinalBody:
    """The closing block: ``files`` maps paths relative to RUN_DIR (POSIX form) to their SHA-256,
    so anyone can check a saved model against the run that made it. ``extra``: further fields the
    caller recorded (kept, hashed and signed, not interpreted)."""

    files: dict[str, str]
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check("final", "files", self.files, dict)
        for path, digest in self.files.items():
            if not isinstance(path, str):  # only a caller's dict can have one: JSON keys are strings
                raise BodyError("final", "files", f"has a path that is not a string: {path!r}")
            _check("final", f"files[{json.dumps(path)}]", digest, str, sha256=True)
        _open_part("final", self.extra, ("files",))

    def to_body(self) -> dict[str, Any]:
        return {**self.extra, "files": dict(self.files)}

    @classmethod
    def from_body(cls, body: object) -> Self:
        known, extra = _fields("final", body, ("files",), open_=True)
        return cls(**known, extra=extra)


Body = GenesisBody | RoundBody | FinalBody
BODIES: dict[str, type[Body]] = {"genesis": GenesisBody, "round": RoundBody, "final": FinalBody}


def parse_body(kind: str, body: object) -> Body:
    """The body of a block of ``kind``; BodyError when it is malformed, ValueError for an unknown kind."""
    if kind not in BODIES:
        raise ValueError(f"unknown block kind {kind!r}")
    return BODIES[kind].from_body(body)
