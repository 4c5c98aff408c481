"""One append-only, signed SQLite ledger per peer: what it accepted, rejected and sent, round by round.

File: ``RUN_DIR/ledger/peer-<k>.sqlite`` (k the global peer id, zero-padded to 4 digits). The run
also writes its roster beside the ledgers (``RUN_DIR/ledger/roster.json``) so a run folder can be
checked on its own (see :mod:`d2ora.trust.audit` for what that does and does not prove).

Blocks form a hash chain, each signed by the peer's Ed25519 key:

* ``hash`` = SHA-256 of the canonical JSON (sorted keys, no spaces, ASCII) of
  ``{index, kind, round, prev_hash, body}``; ``signature`` = the peer's Ed25519 signature of the
  32 raw hash bytes. (The same key signs 160-byte envelope headers; a 32-byte message can never be
  read as one, so the two uses cannot be confused.)
* ``genesis``: index 0, round 0, prev_hash 64 zeros;
* ``round``: one per training round, rounds 1, 2, 3, ... in order;
* ``final``: at most one, last; its round is the last round's.

What each kind's body holds is defined once, by the dataclasses of :mod:`d2ora.trust.blocks`
(:class:`~d2ora.trust.blocks.GenesisBody`, :class:`~d2ora.trust.blocks.RoundBody`,
:class:`~d2ora.trust.blocks.FinalBody`): this module writes bodies only through them and the
auditor reads them only through them.

Tables::

    meta(key TEXT PRIMARY KEY, value TEXT)                       -- 'peer'
    blocks(idx INTEGER PRIMARY KEY, kind TEXT, round INTEGER, prev_hash TEXT, body TEXT,
           hash TEXT, signature TEXT)                            -- hex hashes and signature
    envelopes(block_idx, position, envelope BLOB)                -- accepted, 224 bytes, leaf order
    rejections(block_idx, position, sender, step, check_name, detail, envelope BLOB NULL)
    abandoned(id, rewound_to, idx, kind, round, prev_hash, body, hash, signature,
              envelopes BLOB, rejections TEXT)                   -- blocks dropped by a resume

``PRAGMA application_id`` marks the file as a d2ora ledger and ``user_version`` is the format.
The envelopes of an abandoned block are kept concatenated (they have a fixed size), its rejections
as JSON, so a resumed run keeps every block it ever signed without two live rows per index.

Journal: SQLite's default rollback journal with ``synchronous=FULL``, not WAL. Each append is one
transaction that is on disk when it returns; between appends the ``.sqlite`` file alone is the
whole ledger (WAL keeps committed blocks in a ``-wal`` file beside it until a checkpoint, so a copy
of just the ``.sqlite`` would silently miss them, and WAL needs shared memory that network file
systems may lack). One append per round makes the extra fsync irrelevant.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self
from urllib.parse import quote

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from d2ora.atomic import default_file_mode, write_json
from d2ora.trust.blocks import (
    BodyError,
    FinalBody,
    GenesisBody,
    RejectedRecord,
    RejoinRecord,
    RoundBody,
    SentRecord,
    array_of,
)
from d2ora.trust.envelope import ENVELOPE_BYTES
from d2ora.trust.identity import Roster, verify
from d2ora.trust.merkle import merkle_root

LEDGER_DIR = "ledger"
ROSTER_FILE = "roster.json"
ZERO_HASH = "0" * 64
APPLICATION_ID = 0x44324C47  # "D2LG": tells a d2ora ledger from any other SQLite file
FORMAT_VERSION = 1
KINDS = ("genesis", "round", "final")
_FILE_NAME = re.compile(r"peer-(\d{4,})\.sqlite")

_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE blocks(idx INTEGER PRIMARY KEY, kind TEXT NOT NULL, round INTEGER NOT NULL,
                    prev_hash TEXT NOT NULL, body TEXT NOT NULL, hash TEXT NOT NULL, signature TEXT NOT NULL);
CREATE TABLE envelopes(block_idx INTEGER NOT NULL, position INTEGER NOT NULL, envelope BLOB NOT NULL,
                       PRIMARY KEY(block_idx, position));
CREATE TABLE rejections(block_idx INTEGER NOT NULL, position INTEGER NOT NULL, sender INTEGER NOT NULL,
                        step INTEGER NOT NULL, check_name TEXT NOT NULL, detail TEXT NOT NULL, envelope BLOB,
                        PRIMARY KEY(block_idx, position));
CREATE TABLE abandoned(id INTEGER PRIMARY KEY AUTOINCREMENT, rewound_to INTEGER NOT NULL, idx INTEGER NOT NULL,
                       kind TEXT NOT NULL, round INTEGER NOT NULL, prev_hash TEXT NOT NULL, body TEXT NOT NULL,
                       hash TEXT NOT NULL, signature TEXT NOT NULL, envelopes BLOB NOT NULL, rejections TEXT NOT NULL);
"""


class LedgerError(RuntimeError):
    """A ledger that cannot be created, read or appended to; one line naming file, peer and block."""


@dataclass(frozen=True)
class Rejection:
    """A message a peer refused: from whom, in which gossip step, which check failed and why."""

    sender: int
    step: int
    check: str
    detail: str
    envelope: bytes | None = None  # the raw bytes received, when there were any

    def as_record(self) -> RejectedRecord:
        """What a round body's ``rejected`` holds for it: the envelope only as its digest."""
        digest = None if self.envelope is None else hashlib.sha256(self.envelope).hexdigest()
        return RejectedRecord(self.sender, self.step, self.check, self.detail, digest)

    def record(self) -> dict:
        return self.as_record().to_body()


@dataclass(frozen=True)
class Block:
    index: int
    kind: str
    round: int
    prev_hash: str  # hex
    body: dict
    hash: str  # hex SHA-256 of the canonical block content
    signature: str  # hex Ed25519 signature of the 32 hash bytes


# ------------------------------------------------------------------------------------- hashing
def canonical_json(value: object) -> str:
    """Sorted keys, no spaces, ASCII only, no NaN: one text per value, whatever wrote it."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def block_hash(index: object, kind: object, round: object, prev_hash: object, body: object) -> str:
    """The hex SHA-256 a block's signature covers (typed ``object``: an auditor hashes what it reads)."""
    content = {"index": index, "kind": kind, "round": round, "prev_hash": prev_hash, "body": body}
    return hashlib.sha256(canonical_json(content).encode("ascii")).hexdigest()


def envelope_leaves(envelopes: Iterable[bytes]) -> list[bytes]:
    """The Merkle leaf data of accepted envelopes: each one's SHA-256 (= ``Envelope.digest``)."""
    return [hashlib.sha256(e).digest() for e in envelopes]


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(run_dir: str | os.PathLike[str], paths: Iterable[str | os.PathLike[str]]) -> dict[str, str]:
    """``{path relative to run_dir (POSIX form): sha256}`` for a final block's ``files``."""
    run_dir = Path(run_dir)
    out: dict[str, str] = {}
    for p in paths:
        full = Path(p) if Path(p).is_absolute() else run_dir / p
        out[full.relative_to(run_dir).as_posix()] = file_sha256(full)
    return out


# --------------------------------------------------------------------------------------- paths
def ledger_path(run_dir: str | os.PathLike[str], peer: int) -> Path:
    return Path(run_dir) / LEDGER_DIR / f"peer-{peer:04d}.sqlite"


def ledger_files(run_dir: str | os.PathLike[str]) -> dict[int, Path]:
    """peer -> ledger file, for every ``peer-<k>.sqlite`` in ``RUN_DIR/ledger``."""
    folder = Path(run_dir) / LEDGER_DIR
    found: dict[int, Path] = {}
    for path in sorted(folder.glob("peer-*.sqlite")) if folder.is_dir() else []:
        match = _FILE_NAME.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def write_roster(run_dir: str | os.PathLike[str], roster: Roster) -> Path:
    """``RUN_DIR/ledger/roster.json`` in the format ``load_roster`` reads (atomic write)."""
    return write_json(Path(run_dir) / LEDGER_DIR / ROSTER_FILE, {"peers": roster.canonical()})


# -------------------------------------------------------------------------------------- ledger
def _seal(key: Ed25519PrivateKey, index: int, kind: str, round: int, prev_hash: str, body: dict, where: str) -> Block:
    # Round-trip the body through its canonical JSON so the Block handed back is exactly what a
    # reader will get from the file (tuples become lists, keys strings).
    try:
        body = json.loads(canonical_json(body))
    except (TypeError, ValueError) as exc:
        raise LedgerError(f"{where} block {index}: the {kind} body is not plain JSON ({exc})") from None
    digest = block_hash(index, kind, round, prev_hash, body)
    return Block(index, kind, round, prev_hash, body, digest, key.sign(bytes.fromhex(digest)).hex())


def _insert_block(conn: sqlite3.Connection, block: Block) -> None:
    conn.execute("INSERT INTO blocks(idx, kind, round, prev_hash, body, hash, signature) VALUES (?, ?, ?, ?, ?, ?, ?)",
                 (block.index, block.kind, block.round, block.prev_hash, canonical_json(block.body), block.hash,
                  block.signature))


def _connect(path: Path, read_only: bool) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; every write below opens its own BEGIN
    # IMMEDIATE, so "one append = one transaction" is explicit. check_same_thread=False so that a
    # caller may append from another thread than the one that opened the ledger (d2ora appends from
    # the rounds loop itself); a lock serialises the calls.
    # quote(): a folder named like "run #2?" must not end the path part of the URI early.
    uri = f"file:{quote(path.resolve().as_posix())}?mode={'ro' if read_only else 'rw'}"
    return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)


class Ledger:
    """A peer's ledger file. ``create`` a new one, ``open`` an existing one (read-only without a key)."""

    def __init__(self, path: Path, conn: sqlite3.Connection, peer: int, key: Ed25519PrivateKey | None) -> None:
        self.path = path
        self.peer = peer
        self._conn = conn
        self._key = key
        self._lock = threading.Lock()
        self._last: Block = self._read_last()

    # ------------------------------------------------------------------------------ open/create
    @classmethod
    def create(cls, path: str | os.PathLike[str], peer: int, key: Ed25519PrivateKey,
               genesis: GenesisBody | Mapping[str, object]) -> Ledger:
        """A new ledger holding only its genesis block; refuses an existing file. ``genesis`` is a
        GenesisBody or its fields as a dict (``peer`` may be left out: it is the ledger's).

        Written to a temporary file beside ``path`` and linked into place complete, so a crash
        never leaves a ledger without its genesis, and an existing ledger is never replaced."""
        path = Path(path)
        given = genesis.peer if isinstance(genesis, GenesisBody) else genesis.get("peer", peer)
        if given != peer:
            raise LedgerError(f"ledger {path}: genesis names peer {given}, the ledger is peer {peer}'s")
        if path.exists():
            raise LedgerError(f"ledger {path} (peer {peer}) already exists; a ledger is never replaced (resume opens it)")
        if not isinstance(genesis, GenesisBody):
            try:
                genesis = GenesisBody.from_body({**genesis, "peer": peer})
            except BodyError as exc:
                raise LedgerError(f"ledger {path} (peer {peer}) block 0: {exc}") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version={FORMAT_VERSION}")
                conn.execute("BEGIN IMMEDIATE")
                # statement by statement: executescript would COMMIT the open transaction first
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    conn.execute(statement)
                conn.execute("INSERT INTO meta(key, value) VALUES ('peer', ?)", (str(peer),))
                where = f"ledger {path} (peer {peer})"
                _insert_block(conn, _seal(key, 0, "genesis", 0, ZERO_HASH, genesis.to_body(), where))
                conn.execute("COMMIT")
            finally:
                conn.close()
            os.chmod(tmp, default_file_mode())
            try:
                os.link(tmp, path)  # fails if path appeared meanwhile: never clobbers a ledger
            except FileExistsError:
                raise LedgerError(f"ledger {path} (peer {peer}) already exists; a ledger is never replaced") from None
            except OSError:  # a file system without hard links
                if path.exists():
                    raise LedgerError(f"ledger {path} (peer {peer}) already exists; a ledger is never replaced") from None
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return cls.open(path, key)

    @classmethod
    def open(cls, path: str | os.PathLike[str], key: Ed25519PrivateKey | None = None) -> Ledger:
        """An existing ledger; with ``key`` (its peer's, checked against the genesis signature) it
        can be appended to, without it is read-only."""
        path = Path(path)
        if not path.is_file():
            raise LedgerError(f"ledger {path} does not exist")
        try:
            conn = _connect(path, read_only=key is None)
        except sqlite3.Error as exc:
            raise LedgerError(f"ledger {path}: cannot open it ({exc})") from None
        try:
            try:
                app_id = conn.execute("PRAGMA application_id").fetchone()[0]
                version = conn.execute("PRAGMA user_version").fetchone()[0]
            except sqlite3.DatabaseError:
                raise LedgerError(f"ledger {path} is not a d2ora ledger: not an SQLite database") from None
            if app_id != APPLICATION_ID:
                raise LedgerError(f"ledger {path} is an SQLite database but not a d2ora ledger")
            if version != FORMAT_VERSION:
                raise LedgerError(f"ledger {path} has format {version}; this d2ora reads format {FORMAT_VERSION}")
            conn.execute("PRAGMA synchronous=FULL")  # per connection: every commit is on disk when append returns
            try:
                row = conn.execute("SELECT value FROM meta WHERE key = 'peer'").fetchone()
                peer = int(row[0])
            except (sqlite3.Error, TypeError, ValueError):
                raise LedgerError(f"ledger {path}: no peer id in its meta table") from None
            ledger = cls(path, conn, peer, key)
        except BaseException:
            conn.close()
            raise
        if key is not None:  # appending with another peer's key would fork the chain's signer
            try:
                genesis = ledger.genesis()
                signed = verify(key.public_key(), bytes.fromhex(genesis.signature), bytes.fromhex(genesis.hash))
            except (LedgerError, ValueError, TypeError):
                signed = False
            if not signed:
                ledger.close()
                raise LedgerError(f"ledger {path} (peer {peer}): the key given did not sign its genesis block")
        return ledger

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------- reading
    def _where(self, index: int | None = None) -> str:
        return f"ledger {self.path} (peer {self.peer})" + ("" if index is None else f" block {index}")

    def _block(self, row: tuple) -> Block:
        index, kind, rnd, prev_hash, body_text, digest, signature = row
        try:
            body = json.loads(body_text)
        except (TypeError, ValueError):
            raise LedgerError(f"{self._where(index)}: its body is not JSON") from None
        if not isinstance(body, dict):
            raise LedgerError(f"{self._where(index)}: its body is not a JSON object")
        return Block(index, kind, rnd, prev_hash, body, digest, signature)

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            with self._lock:
                return self._conn.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{self._where()}: cannot read it ({exc})") from None

    def _read_last(self) -> Block:
        rows = self._query("SELECT idx, kind, round, prev_hash, body, hash, signature FROM blocks ORDER BY idx DESC LIMIT 1")
        if not rows:
            raise LedgerError(f"{self._where()}: no blocks, not even a genesis")
        return self._block(rows[0])

    def blocks(self) -> list[Block]:
        rows = self._query("SELECT idx, kind, round, prev_hash, body, hash, signature FROM blocks ORDER BY idx")
        return [self._block(r) for r in rows]

    def genesis(self) -> Block:
        rows = self._query("SELECT idx, kind, round, prev_hash, body, hash, signature FROM blocks WHERE idx = 0")
        if not rows:
            raise LedgerError(f"{self._where(0)}: the genesis block is missing")
        return self._block(rows[0])

    def envelopes(self, block_index: int) -> list[bytes]:
        # CAST: a value edited into TEXT still comes back as bytes (and then fails the checks, not the reader)
        rows = self._query("SELECT CAST(envelope AS BLOB) FROM envelopes WHERE block_idx = ? ORDER BY position",
                           (block_index,))
        return [bytes(r[0]) for r in rows]

    def rejections(self, block_index: int) -> list[Rejection]:
        rows = self._query("SELECT sender, step, check_name, detail, CAST(envelope AS BLOB) FROM rejections "
                           "WHERE block_idx = ? ORDER BY position", (block_index,))
        return [Rejection(s, t, c, d, None if e is None else bytes(e)) for s, t, c, d, e in rows]

    def abandoned(self) -> list[dict]:
        """Blocks a resume dropped: ``{rewound_to, index, kind, round, hash}`` in the order dropped."""
        rows = self._query("SELECT rewound_to, idx, kind, round, hash FROM abandoned ORDER BY id")
        return [dict(zip(("rewound_to", "index", "kind", "round", "hash"), r, strict=True)) for r in rows]

    @property
    def head(self) -> bytes:
        """The 32-byte hash of the last block: what this peer's envelopes carry as ledger_head."""
        return bytes.fromhex(self._last.hash)

    @property
    def last_round(self) -> int:
        """The last round block's round; 0 when there is only the genesis."""
        rows = self._query("SELECT MAX(round) FROM blocks WHERE kind = 'round'")
        return rows[0][0] or 0

    @property
    def finalised(self) -> bool:
        return self._last.kind == "final"

    # --------------------------------------------------------------------------------- writing
    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        if self._key is None:
            raise LedgerError(f"{self._where()}: opened read-only (no key), cannot append")
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise LedgerError(f"{self._where()}: cannot write ({exc})") from None
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def _append(self, kind: str, round: int, body: dict, accepted: Sequence[bytes] = (),
                rejected: Sequence[Rejection] = ()) -> Block:
        assert self._key is not None  # _transaction refuses a read-only ledger first
        index = self._last.index + 1
        block = _seal(self._key, index, kind, round, self._last.hash, body, self._where())
        try:
            with self._transaction() as conn:
                _insert_block(conn, block)
                conn.executemany("INSERT INTO envelopes(block_idx, position, envelope) VALUES (?, ?, ?)",
                                 [(index, i, e) for i, e in enumerate(accepted)])
                conn.executemany("INSERT INTO rejections(block_idx, position, sender, step, check_name, detail, envelope) "
                                 "VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 [(index, i, r.sender, r.step, r.check, r.detail, r.envelope)
                                  for i, r in enumerate(rejected)])
        except sqlite3.Error as exc:
            raise LedgerError(f"{self._where(index)}: cannot append the {kind} block ({exc})") from None
        self._last = block
        return block

    def _require_open_for(self, what: str) -> None:
        if self._key is None:
            raise LedgerError(f"{self._where()}: opened read-only (no key), cannot append {what}")
        if self.finalised:
            raise LedgerError(f"{self._where(self._last.index)}: the ledger is final, cannot append {what}")

    def append_round(self, round: int, accepted: Sequence[bytes], rejected: Sequence[Rejection],
                     sent: Sequence[tuple[int, bytes]], adapter_sha256: str, rejoined: RejoinRecord | None = None) -> Block:
        """Record one training round in one transaction: the envelopes this peer accepted (in
        Merkle leaf order), the messages it rejected, the payload digest it sent each gossip step
        and the SHA-256 of its own adapter after mixing. ``rejoined``: the round a peer came back
        in, after the rounds it names as missed (the only way a round may skip ahead)."""
        self._require_open_for(f"round {round}")
        expected = self.last_round + 1
        if rejoined is not None and rejoined.missed_from != expected:
            raise LedgerError(f"{self._where()}: round {round} rejoins after round {rejoined.missed_from - 1}, "
                              f"but the ledger's last round is {expected - 1}")
        if round != expected and (rejoined is None or round != rejoined.missed_to + 1):
            raise LedgerError(f"{self._where()}: round {round} appended after round {expected - 1}; rounds go in order")
        accepted = [bytes(e) for e in accepted]
        for i, e in enumerate(accepted):
            if len(e) != ENVELOPE_BYTES:
                raise LedgerError(f"{self._where()}: round {round} accepted envelope {i} has {len(e)} bytes, "
                                  f"not {ENVELOPE_BYTES}")
        for step, digest in sent:
            if len(digest) != 32:
                raise LedgerError(f"{self._where()}: round {round} step {step}: a payload digest has 32 bytes, "
                                  f"not {len(digest)}")
        try:
            body = RoundBody(
                round=round,
                merkle_root=merkle_root(envelope_leaves(accepted)).hex(),
                accepted=len(accepted),
                rejected=array_of("round", "rejected", rejected, Rejection.as_record),
                sent=tuple(SentRecord(int(step), bytes(digest).hex()) for step, digest in sent),
                adapter_sha256=adapter_sha256,
                rejoined=rejoined,
            )
        except BodyError as exc:  # e.g. an adapter digest that is not 64 lower-case hex digits
            raise LedgerError(f"{self._where()}: round {round}: {exc}") from None
        return self._append("round", round, body.to_body(), accepted, rejected)

    def append_final(self, body: FinalBody | Mapping[str, object]) -> Block:
        """The closing block: a FinalBody, or its fields as a dict ``{files: {path relative to
        RUN_DIR: sha256}, ...}`` (see file_digests)."""
        self._require_open_for("the final block")
        if not isinstance(body, FinalBody):
            try:
                body = FinalBody.from_body(body)
            except BodyError as exc:
                raise LedgerError(f"{self._where()}: a final block needs 'files': {{relative path: sha256 hex}} "
                                  f"({exc})") from None
        return self._append("final", self.last_round, body.to_body())

    def rewind(self, round: int) -> int:
        """Resume support: move the blocks of rounds after ``round`` (and the final block) to the
        ``abandoned`` table, in one transaction; returns how many moved. The head is then the
        block of ``round`` (or the genesis for 0), which is what the resumed run signs next."""
        if self._key is None:
            raise LedgerError(f"{self._where()}: opened read-only (no key), cannot rewind")
        last = self.last_round
        if not 0 <= round <= last:
            raise LedgerError(f"{self._where()}: cannot rewind to round {round}, the ledger holds rounds 0..{last}")
        rows = self._query("SELECT idx, kind, round, prev_hash, body, hash, signature FROM blocks "
                           "WHERE (kind = 'round' AND round > ?) OR kind = 'final' ORDER BY idx", (round,))
        if not rows:
            return 0
        moved = []
        for row in rows:
            index = row[0]
            envelopes = b"".join(self.envelopes(index))
            try:
                rejections = [{**r.record(), "envelope": None if r.envelope is None else r.envelope.hex()}
                              for r in self.rejections(index)]
            except BodyError as exc:  # a row edited to another type: `ledger verify` says more
                raise LedgerError(f"{self._where(index)}: a stored rejection is malformed ({exc}), cannot rewind") from None
            moved.append((round, *row, envelopes, canonical_json(rejections)))
        first = rows[0][0]
        try:
            with self._transaction() as conn:
                conn.executemany("INSERT INTO abandoned(rewound_to, idx, kind, round, prev_hash, body, hash, signature, "
                                 "envelopes, rejections) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", moved)
                conn.execute("DELETE FROM envelopes WHERE block_idx >= ?", (first,))
                conn.execute("DELETE FROM rejections WHERE block_idx >= ?", (first,))
                conn.execute("DELETE FROM blocks WHERE idx >= ?", (first,))
        except sqlite3.Error as exc:
            raise LedgerError(f"{self._where(first)}: cannot rewind to round {round} ({exc})") from None
        self._last = self._read_last()
        return len(rows)
