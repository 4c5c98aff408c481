"""Check a run folder's ledgers against each other, against the roster and against the saved files.

:func:`verify_run` answers "is this run's record intact and consistent?":

* each ledger on its own: genesis first, contiguous indices, the prev_hash chain, every block's
  hash recomputed from its contents and signed by its peer's roster key, rounds 1, 2, 3, ... in
  order, each round's Merkle root recomputed from the stored envelopes, counts and rejection
  records matching what the block says;
* the ledgers together: all end at the same round (a chain cut short is valid on its own), all
  genesis blocks agree on run_id, roster, config and layout digests (and run_id is bound to its
  nonce and those digests); every accepted envelope parses, is addressed to the ledger's peer, is
  for that block's round, comes from an in-neighbour the genesis lists (when it lists them),
  carries the run's run_id, is signed by its sender's roster key, and carries as ``ledger_head``
  the hash of the sender's block that was its head when it sent (its previous round block, or its
  genesis in round 1). So what peer i recorded as received from j is exactly what j signed, at the
  point of j's chain where j says it was;
* equivocation, its own category: two envelopes signed by one sender for one (round, step) with
  different payload digests, or a signed envelope whose payload differs from (or is missing in)
  what the sender's own block records as sent in that step. The signed envelopes are the proof;
* the files every ``final`` block lists are rehashed from the run folder.

A peer that left and came back (``d2ora peer --resume`` over links) has a gap: its ledger was
rewound to its last checkpoint's round, and the round it rejoined in is a round block that names
the rounds it missed (``rejoined``). The audit accepts such a gap when it is declared exactly where
the rounds skip, and explains it (:attr:`AuditReport.gaps`); envelopes it had signed in the missed
rounds before it stopped, which its neighbours accepted then, cannot be tied to blocks it no longer
holds, and are listed as notes rather than problems.

The trust anchor is the roster. Without one given, the run folder's own ``ledger/roster.json`` is
used, which only proves the run is consistent with itself: whoever can rewrite the folder could
re-sign every ledger with keys of their own. A roster obtained independently (``--roster``) is
what ties the blocks to the peers' real keys.

:func:`inclusion` gives RFC 6962 audit paths showing that one peer's envelopes of one round are
under the Merkle roots its receivers signed.

Blocks dropped by a resume (``abandoned``) are counted, not checked: they are not part of the chain
and a resumed round legitimately re-sends its slots.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from d2ora.trust.blocks import (
    Body,
    BodyError,
    FinalBody,
    GenesisBody,
    RejoinRecord,
    RoundBody,
    parse_body,
)
from d2ora.trust.envelope import ENVELOPE_BYTES, EnvelopeError, parse, run_identity
from d2ora.trust.identity import IdentityError, Roster, load_roster, verify
from d2ora.trust.ledger import (
    LEDGER_DIR,
    ROSTER_FILE,
    ZERO_HASH,
    Block,
    Ledger,
    LedgerError,
    Rejection,
    block_hash,
    envelope_leaves,
    file_sha256,
    ledger_files,
)
from d2ora.trust.merkle import inclusion_proof, merkle_root, verify_inclusion
from d2ora.trust.rejections import rejected_by_sender

#: Genesis fields every peer of one run must share.
SHARED_GENESIS = ("run_id", "roster_sha256", "config_sha256", "layout_sha256")


class AuditError(ValueError):
    """A run folder that cannot be audited at all (missing, or the proof asked for does not hold)."""


@dataclass(frozen=True)
class Problem:
    """One failed check, as one line naming the ledger file, the peer and the block."""

    message: str
    peer: int | None = None
    block: int | None = None
    file: str | None = None


@dataclass(frozen=True)
class Equivocation:
    """A sender that signed two different payloads for one slot (or signed one its ledger denies)."""

    sender: int
    round: int
    step: int
    message: str
    envelopes: tuple[str, ...]  # hex of the signed envelopes that prove it
    receivers: tuple[int, ...]


@dataclass(frozen=True)
class Gap:
    """Rounds a peer missed, declared by the round block it rejoined in."""

    peer: int
    missed: range
    rejoined_round: int
    detail: str
    file: str
    block: int

    @property
    def message(self) -> str:
        if len(self.missed):
            what = (f"missed round {self.missed.start}" if len(self.missed) == 1
                    else f"missed rounds {self.missed.start}-{self.missed.stop - 1}")
        else:
            what = "missed no round"
        return f"peer {self.peer} {what}, rejoined in round {self.rejoined_round} ({self.file} block {self.block}): {self.detail}"


@dataclass
class AuditReport:
    run_dir: Path
    roster_source: str  # "given" or the run folder's roster file
    peers: int = 0
    blocks: int = 0
    envelopes: int = 0
    rejections: int = 0
    abandoned: int = 0
    problems: list[Problem] = field(default_factory=list)
    equivocations: list[Equivocation] = field(default_factory=list)
    #: Declared gaps (peers that left and came back): legitimate, explained.
    gaps: list[Gap] = field(default_factory=list)
    #: What is not a problem but cannot be checked (envelopes a peer signed in rounds it missed).
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.equivocations

    @property
    def self_anchored(self) -> bool:
        """True when the roster came from the run folder itself (see the module docstring)."""
        return self.roster_source != "given"

    def counts(self) -> str:
        return f"{self.peers} peers, {self.blocks} blocks, {self.envelopes} envelopes, {self.rejections} rejected"

    def summary(self) -> str:
        if self.ok:
            return f"verified: {self.counts()}"
        return (f"NOT verified: {len(self.problems)} problem(s), {len(self.equivocations)} equivocation(s) "
                f"({self.counts()})")

    def lines(self) -> list[str]:
        return [p.message for p in self.problems] + [e.message for e in self.equivocations]

    def explanations(self) -> list[str]:
        """The gaps and notes, one line each: why a verified run may still skip rounds."""
        return [g.message for g in self.gaps] + self.notes


# ---------------------------------------------------------------------------------------- state
@dataclass
class _Peer:
    """What the audit read from one ledger file."""

    peer: int
    file: str  # as shown: relative to the run folder
    blocks: list[Block]
    true_hash: dict[int, str] = field(default_factory=dict)  # block index -> recomputed hash
    bodies: dict[int, Body] = field(default_factory=dict)  # block index -> its body, if well-formed
    rounds: dict[int, Block] = field(default_factory=dict)  # round -> its round block (body well-formed)
    envelopes: dict[int, list[bytes]] = field(default_factory=dict)
    rejections: dict[int, list[Rejection]] = field(default_factory=dict)

    @property
    def genesis(self) -> Block | None:
        first = self.blocks[0] if self.blocks else None
        return first if first is not None and first.kind == "genesis" and first.index == 0 else None

    @property
    def genesis_body(self) -> GenesisBody | None:
        body = None if self.genesis is None else self.bodies.get(self.genesis.index)
        return body if isinstance(body, GenesisBody) else None

    def round_body(self, block: Block) -> RoundBody:
        """The body of a block in ``rounds`` (only well-formed round bodies get there)."""
        body = self.bodies[block.index]
        assert isinstance(body, RoundBody)
        return body

    def rejoin_covering(self, rnd: int) -> RejoinRecord | None:
        """The rejoin record whose missed rounds include ``rnd``, or whose block is round ``rnd``."""
        for block in self.rounds.values():
            rejoined = self.round_body(block).rejoined
            if rejoined is not None and (rnd in rejoined.missed or rnd == block.round):
                return rejoined
        return None

    def head_for(self, rnd: int) -> str | None:
        """The hash this peer's envelopes of round ``rnd`` must carry: its previous round block's
        (its genesis's in round 1; in the round it rejoined in, its checkpoint round's, the block
        before the gap), recomputed from the contents rather than the stored column."""
        this = self.rounds.get(rnd)
        rejoined = None if this is None else self.round_body(this).rejoined
        before = rnd - 1 if rejoined is None else rejoined.missed_from - 1  # a rejoin round follows its checkpoint's
        block = self.genesis if before == 0 else self.rounds.get(before)
        return None if block is None else self.true_hash.get(block.index)


def _at(p: _Peer, block: Block) -> str:
    label = f"round {block.round}" if block.kind == "round" else str(block.kind)
    return f"{p.file}: peer {p.peer} block {block.index} ({label})"


class _Audit:
    def __init__(self, run_dir: Path, roster: Roster | None) -> None:
        self.run_dir = run_dir
        self.report = AuditReport(run_dir, "given" if roster is not None else f"{LEDGER_DIR}/{ROSTER_FILE}")
        self.roster = roster
        self.peers: dict[int, _Peer] = {}
        self.run_id: bytes | None = None
        # (sender, round, step) -> payload hex -> [(envelope, receiver, where)]
        self.statements: dict[tuple[int, int, int], dict[str, list[tuple[bytes, int, str]]]] = defaultdict(dict)

    def problem(self, message: str, peer: int | None = None, block: int | None = None, file: str | None = None) -> None:
        self.report.problems.append(Problem(message, peer, block, file))

    def rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.run_dir).as_posix()
        except ValueError:
            return str(path)

    def key_of(self, peer: int) -> Ed25519PublicKey | None:
        member = None if self.roster is None else self.roster.members.get(peer)
        return None if member is None else member.public_key

    # ------------------------------------------------------------------------------ roster
    def load_roster(self) -> None:
        folder_file = self.run_dir / LEDGER_DIR / ROSTER_FILE
        shown = self.rel(folder_file)
        if self.roster is None:
            if not folder_file.is_file():
                self.problem(f"{shown}: missing, so no signature can be checked (give --roster)", file=shown)
                return
            try:
                self.roster = load_roster(folder_file)
            except IdentityError as exc:
                self.problem(f"{shown}: {exc}", file=shown)
            return
        if folder_file.is_file():  # the given roster is the anchor; the folder's copy must agree with it
            try:
                own = load_roster(folder_file)
            except IdentityError as exc:
                self.problem(f"{shown}: {exc}", file=shown)
                return
            if own.sha256 != self.roster.sha256:
                differ = sorted(p for p in set(own.members) | set(self.roster.members)
                                if (own.members.get(p) and own.members[p].key_string)
                                != (self.roster.members.get(p) and self.roster.members[p].key_string))
                who = f"peer(s) {differ}" if differ else "names"
                self.problem(f"{shown}: differs from the roster given (--roster) for {who}: "
                             f"sha256 {own.sha256[:16]}… vs {self.roster.sha256[:16]}…", file=shown)

    # ----------------------------------------------------------------------------- ledgers
    def read_ledgers(self) -> None:
        files = ledger_files(self.run_dir)
        if not files:
            self.problem(f"{LEDGER_DIR}/: no peer-<k>.sqlite ledgers in {self.run_dir}")
            return
        for missing in sorted(set(range(max(files) + 1)) - set(files)):
            shown = f"{LEDGER_DIR}/peer-{missing:04d}.sqlite"
            self.problem(f"{shown}: peer {missing}'s ledger is missing (peers 0..{max(files)} took part)", missing, file=shown)
        for peer, path in files.items():
            shown = self.rel(path)
            try:
                with Ledger.open(path) as ledger:
                    if ledger.peer != peer:
                        self.problem(f"{shown}: the file holds peer {ledger.peer}'s ledger, not peer {peer}'s", peer, file=shown)
                        continue
                    blocks = ledger.blocks()
                    state = _Peer(peer, shown, blocks)
                    for b in blocks:
                        state.envelopes[b.index] = ledger.envelopes(b.index)
                        state.rejections[b.index] = ledger.rejections(b.index)
                    self.report.abandoned += len(ledger.abandoned())
            except LedgerError as exc:
                self.problem(f"{shown}: {exc}", peer, file=shown)
                continue
            self.peers[peer] = state
            self.report.peers += 1
            self.report.blocks += len(blocks)
            self.report.envelopes += sum(len(v) for v in state.envelopes.values())
            self.report.rejections += sum(len(v) for v in state.rejections.values())

    # ------------------------------------------------------------------------------- chain
    def check_chain(self, p: _Peer) -> None:
        key = self.key_of(p.peer)
        if key is None and self.roster is not None:
            self.problem(f"{p.file}: peer {p.peer} is not on the roster, so its blocks' signatures cannot be checked",
                         p.peer, file=p.file)
        expected_round = 0
        for pos, b in enumerate(p.blocks):
            at = _at(p, b)

            def bad(message: str, b: Block = b, at: str = at) -> None:
                self.problem(f"{at}: {message}", p.peer, b.index, p.file)

            try:
                true = block_hash(b.index, b.kind, b.round, b.prev_hash, b.body)
            except (TypeError, ValueError):  # a column edited to a BLOB: not JSON, cannot be what was signed
                true = "not hashable"
            p.true_hash[b.index] = true
            if b.index != pos:
                bad(f"found at position {pos}: a block is missing or the blocks were reordered")
            if b.kind not in ("genesis", "round", "final"):
                bad(f"unknown kind {b.kind!r}")
            if (pos == 0) != (b.kind == "genesis"):
                bad("the first block must be the genesis, and only the first" if pos == 0 else "a second genesis block")
            previous = ZERO_HASH if pos == 0 else p.true_hash[p.blocks[pos - 1].index]
            if b.prev_hash != previous:
                bad(f"prev_hash {str(b.prev_hash)[:16]}… is not the hash of the block before it ({previous[:16]}…)")
            if true != b.hash:
                bad(f"hash {str(b.hash)[:16]}… does not match its contents ({true[:16]}…): the block was edited")
            if key is not None and not _signed(key, b.signature, b.hash):
                bad(f"signature is not peer {p.peer}'s (roster key) over the block hash")
            if b.kind in ("genesis", "round", "final"):
                try:
                    p.bodies[b.index] = parse_body(b.kind, b.body)
                except BodyError as exc:  # one problem naming the field; the body is not used further
                    bad(str(exc))
            if b.kind == "genesis" and b.round != 0:
                bad(f"genesis round is {b.round!r}, not 0")
            if b.kind == "final":
                if pos != len(p.blocks) - 1:
                    bad("a final block that is not the last block")
                if b.round != expected_round:
                    bad(f"final block says round {b.round!r}, the last round block is round {expected_round}")
            if b.kind == "round":
                body = p.bodies.get(b.index)
                rejoined = body.rejoined if isinstance(body, RoundBody) else None
                if rejoined is not None:  # a declared gap: it must start right after the previous round
                    if rejoined.missed_from != expected_round + 1:
                        bad(f"rejoins after round {rejoined.missed_from - 1}, but the round before it is {expected_round}")
                    else:
                        self.report.gaps.append(Gap(p.peer, rejoined.missed, b.round, rejoined.detail, p.file, b.index))
                    expected_round = b.round if isinstance(b.round, int) else expected_round + 1
                else:
                    expected_round += 1
                    if b.round != expected_round:
                        bad(f"round {b.round!r} where round {expected_round} was expected (rounds go 1, 2, 3, ...)")
                        expected_round = b.round if isinstance(b.round, int) else expected_round
                # Even a block that fails a check above stays usable for the cross-ledger checks
                # (its envelopes are signed by their senders, its true hash is known): what it
                # breaks there is reported too, after the chain problems. A malformed body is not.
                if isinstance(body, RoundBody):
                    self.check_round_body(p, b, body, bad)
                    if isinstance(b.round, int) and b.round not in p.rounds:
                        p.rounds[b.round] = b

    def check_round_body(self, p: _Peer, b: Block, body: RoundBody, bad: Callable[[str], None]) -> None:
        """A well-formed round body against its block and the envelopes and rejections stored with it."""
        if body.round != b.round:
            bad(f"body says round {body.round}, the block round {b.round}")
        envelopes = p.envelopes.get(b.index, [])
        root = merkle_root(envelope_leaves(envelopes)).hex()
        if root != body.merkle_root:
            bad(f"merkle_root {body.merkle_root[:16]}… does not match its {len(envelopes)} stored envelopes ({root[:16]}…)")
        if body.accepted != len(envelopes):
            bad(f"records {body.accepted} accepted envelopes, the file stores {len(envelopes)}")
        rows = p.rejections.get(b.index, [])
        try:
            stored: list | None = [r.as_record() for r in rows]
        except BodyError:  # a rejections row edited to another type cannot match any record
            stored = None
        if stored != list(body.rejected):
            bad(f"its {len(body.rejected)} rejection record(s) do not match the {len(rows)} stored")

    def check_lengths(self) -> None:
        """Every peer runs the same rounds, so every ledger must end alike: a chain that is shorter
        than the others is still a valid chain on its own, and only this comparison shows that blocks
        were cut off its end (or that the peer stopped early)."""
        def ending(e: tuple[int, bool]) -> str:
            return f"round {e[0]} {'with' if e[1] else 'without'} a final block"

        ends = {k: (max((b.round for b in p.blocks if b.kind == "round" and isinstance(b.round, int)), default=0),
                    any(b.kind == "final" for b in p.blocks))
                for k, p in self.peers.items() if p.blocks}
        if not ends:
            return
        longest = max(ends, key=lambda k: (ends[k], -k))
        for k, end in ends.items():
            if end != ends[longest]:
                p = self.peers[k]
                self.problem(f"{_at(p, p.blocks[-1])}: the ledger ends at {ending(end)}, peer {longest}'s at "
                             f"{ending(ends[longest])}: blocks were cut off or the peer stopped early",
                             k, p.blocks[-1].index, p.file)

    # ---------------------------------------------------------------------------- genesis
    def check_genesis(self) -> None:
        reference: dict[str, tuple[int, object]] = {}
        for p in self.peers.values():
            g, body = p.genesis, p.genesis_body
            if g is None or body is None:
                continue  # check_chain reported it (no genesis, or a malformed body)
            at = _at(p, g)
            if body.peer != p.peer:
                self.problem(f"{at}: genesis names peer {body.peer!r}", p.peer, 0, p.file)
            for name in SHARED_GENESIS:
                value = getattr(body, name)
                if name not in reference:
                    reference[name] = (p.peer, value)
                elif reference[name][1] != value:
                    ref_peer, ref_value = reference[name]
                    self.problem(f"{at}: {name} {value[:16]}… differs from peer {ref_peer}'s {str(ref_value)[:16]}…",
                                 p.peer, 0, p.file)
            if self.roster is not None and body.roster_sha256 != self.roster.sha256:
                source = "the roster given (--roster)" if self.report.roster_source == "given" else self.report.roster_source
                self.problem(f"{at}: roster_sha256 {body.roster_sha256[:16]}… is not the SHA-256 of {source} "
                             f"({self.roster.sha256[:16]}…)", p.peer, 0, p.file)
            bound = run_identity(bytes.fromhex(body.nonce), body.config_sha256, body.roster_sha256,
                                 body.layout_sha256).hex() == body.run_id
            if not bound:
                self.problem(f"{at}: run_id is not the one its nonce, config, roster and layout digests give",
                             p.peer, 0, p.file)
        if "run_id" in reference:
            try:
                self.run_id = bytes.fromhex(str(reference["run_id"][1]))
            except ValueError:
                self.run_id = None

    # -------------------------------------------------------------------------- envelopes
    def check_envelopes(self, p: _Peer) -> None:
        genesis = p.genesis_body
        listed = None if genesis is None else genesis.in_neighbours
        in_neighbours = None if listed is None else set(listed)  # optional in a genesis body
        for rnd, b in sorted(p.rounds.items()):
            at = _at(p, b)
            seen: set[bytes] = set()
            for pos, raw in enumerate(p.envelopes[b.index]):
                where = f"{at}: accepted envelope {pos}"

                def bad(message: str, where: str = where, b: Block = b) -> None:
                    self.problem(f"{where} {message}", p.peer, b.index, p.file)

                if raw in seen:
                    bad("was accepted twice")
                seen.add(raw)
                try:
                    env = parse(raw)
                except EnvelopeError as exc:
                    bad(f"does not parse: {exc}")
                    continue
                h = env.header
                if h.receiver != p.peer:
                    bad(f"is addressed to peer {h.receiver}")
                if h.round != rnd:
                    bad(f"is for round {h.round}")
                if in_neighbours is not None and h.sender not in in_neighbours:
                    bad(f"is from peer {h.sender}, not one of the in-neighbours its genesis lists {sorted(in_neighbours)}")
                run_ok = self.run_id is not None and h.run_id == self.run_id
                if not run_ok:
                    bad(f"carries run_id {h.run_id.hex()[:16]}…, not this run's")
                key = self.key_of(h.sender)
                signed = key is not None and env.signed_by(key)
                if key is None:
                    if self.roster is not None:  # without any roster that was reported once already
                        bad(f"is from peer {h.sender}, who is not on the roster")
                elif not signed:
                    bad(f"is not signed by its sender peer {h.sender} (roster key)")
                sender = self.peers.get(h.sender)
                expected = None if sender is None else sender.head_for(h.round)
                gap = None if sender is None or not isinstance(h.round, int) else sender.rejoin_covering(h.round)
                if gap is not None and (expected is None or h.ledger_head.hex() != expected):
                    # Signed in a round its sender later missed: before it stopped, from blocks it no longer holds.
                    self.report.notes.append(
                        f"{where} is peer {h.sender}'s message of round {h.round}, a round its ledger records as missed "
                        f"(it stopped after sending it and rejoined in round {gap.missed_to + 1}): its ledger_head "
                        "cannot be checked against blocks it no longer holds")
                    expected = h.ledger_head.hex()
                if sender is None:
                    bad(f"is from peer {h.sender}, whose ledger is missing or unreadable (ledger_head cannot be checked)")
                elif expected is None:
                    bad(f"is from peer {h.sender}, whose ledger has no valid block before round {h.round}")
                elif h.ledger_head.hex() != expected:
                    bad(f"carries ledger_head {h.ledger_head.hex()[:16]}…, but peer {h.sender}'s head when sending round "
                        f"{h.round} was {expected[:16]}… ({sender.file})")
                if signed and run_ok:
                    self.note_statement(raw, p.peer, f"{p.file} block {b.index}")
            # Rejected envelopes that are genuinely signed are the sender's statements too.
            for r in p.rejections[b.index]:
                if r.envelope is not None and len(r.envelope) == ENVELOPE_BYTES:
                    self.note_signed(r.envelope, p.peer, f"{p.file} block {b.index}")

    def note_signed(self, raw: bytes, receiver: int, where: str) -> None:
        try:
            env = parse(raw)
        except EnvelopeError:
            return
        key = self.key_of(env.header.sender)
        if key is not None and env.header.run_id == self.run_id and env.signed_by(key):
            self.note_statement(raw, receiver, where)

    def note_statement(self, raw: bytes, receiver: int, where: str) -> None:
        h = parse(raw).header
        self.statements[(h.sender, h.round, h.step)].setdefault(h.payload_sha256.hex(), []).append((raw, receiver, where))

    # ----------------------------------------------------------------------- equivocation
    def check_equivocation(self) -> None:
        for (sender, rnd, step), payloads in sorted(self.statements.items()):
            head = f"peer {sender} equivocated in round {rnd} step {step}"
            sender_state = self.peers.get(sender)
            block = None if sender_state is None else sender_state.rounds.get(rnd)
            rejoined = block is not None and sender_state is not None and sender_state.round_body(block).rejoined is not None
            if len(payloads) > 1 and not rejoined:  # a rejoin round's two are its message before it stopped and after
                (pa, [(ea, ra, wa), *_]), (pb, [(eb, rb, wb), *_]) = list(payloads.items())[:2]
                self.report.equivocations.append(Equivocation(
                    sender, rnd, step,
                    f"{head}: it signed payload {pa[:16]}… for peer {ra} ({wa}) and {pb[:16]}… for peer {rb} ({wb})",
                    (ea.hex(), eb.hex()), (ra, rb)))
            if block is None or sender_state is None:
                continue  # nothing to compare with (a missing or rewound ledger is reported elsewhere)
            recorded = [s for s in sender_state.round_body(block).sent if s.step == step]
            recorded_digests = {s.payload_sha256 for s in recorded}
            for payload, held in payloads.items():
                if payload in recorded_digests:
                    continue
                raw, receiver, where = held[0]
                if rejoined:  # it stopped after sending in the round it later rejoined in: that message came first
                    self.report.notes.append(
                        f"peer {receiver} ({where}) holds peer {sender}'s message of round {rnd} step {step} signed before "
                        f"it stopped; its ledger records what it sent when it rejoined in that round")
                    continue
                claim = (f"its ledger ({sender_state.file} block {block.index}) records no message sent in that step"
                         if not recorded else
                         f"its ledger ({sender_state.file} block {block.index}) records payload "
                         f"{recorded[0].payload_sha256[:16]}… sent")
                self.report.equivocations.append(Equivocation(
                    sender, rnd, step,
                    f"{head}: {claim}, but peer {receiver} ({where}) holds payload {payload[:16]}… signed by peer {sender}",
                    (raw.hex(),), (receiver,)))

    # ------------------------------------------------------------------------------ files
    def check_files(self, p: _Peer) -> None:
        for b in p.blocks:
            body = p.bodies.get(b.index)
            if b.kind != "final" or not isinstance(body, FinalBody):
                continue  # a malformed final body was reported by check_chain
            at = _at(p, b)
            for rel, digest in sorted(body.files.items()):
                pure = PurePosixPath(rel)
                if pure.is_absolute() or ".." in pure.parts or not pure.parts:
                    self.problem(f"{at}: file path {rel!r} is not inside the run folder", p.peer, b.index, p.file)
                    continue
                path = self.run_dir / pure
                if not path.is_file():
                    self.problem(f"{at}: {rel} is missing", p.peer, b.index, rel)
                    continue
                try:
                    now = file_sha256(path)
                except OSError as exc:
                    self.problem(f"{at}: {rel} cannot be read ({exc.strerror})", p.peer, b.index, rel)
                    continue
                if now != digest:
                    self.problem(f"{at}: {rel} changed: sha256 {now[:16]}…, the ledger recorded {digest[:16]}…",
                                 p.peer, b.index, rel)

    def run(self) -> AuditReport:
        self.read_ledgers()
        self.load_roster()
        for p in self.peers.values():
            self.check_chain(p)
        self.check_lengths()
        self.check_genesis()
        for p in self.peers.values():
            self.check_envelopes(p)
        for p in self.peers.values():
            self.check_files(p)
        self.check_equivocation()
        return self.report


def _signed(key: Ed25519PublicKey, signature: object, digest: object) -> bool:
    try:
        return verify(key, bytes.fromhex(str(signature)), bytes.fromhex(str(digest)))
    except ValueError:  # not hex: edited
        return False


def _require_run_dir(run_dir: str | os.PathLike[str]) -> Path:
    path = Path(run_dir)
    if not path.is_dir():
        raise AuditError(f"run folder {path} does not exist")
    if not (path / LEDGER_DIR).is_dir():
        raise AuditError(f"{path} has no {LEDGER_DIR}/ folder: the run kept no ledger")
    return path


def verify_run(run_dir: str | os.PathLike[str], roster: Roster | None = None) -> AuditReport:
    """Every check of the module docstring; ``roster`` is the trust anchor (None: the run folder's
    own ``ledger/roster.json``, which proves only self-consistency)."""
    return _Audit(_require_run_dir(run_dir), roster).run()


def inclusion(run_dir: str | os.PathLike[str], peer: int, round: int) -> list[dict]:
    """RFC 6962 proofs that ``peer``'s envelopes of ``round`` are under the Merkle roots of the
    round blocks of every receiver that accepted one, each checked before it is returned."""
    run_dir = _require_run_dir(run_dir)
    proofs: list[dict] = []
    for receiver, path in ledger_files(run_dir).items():
        with Ledger.open(path) as ledger:
            blocks = [b for b in ledger.blocks() if b.kind == "round" and b.round == round]
            if not blocks:
                continue
            block = blocks[0]
            envelopes = ledger.envelopes(block.index)
        shown = path.relative_to(run_dir).as_posix()
        leaves = envelope_leaves(envelopes)
        try:
            root, malformed = bytes.fromhex(RoundBody.from_body(block.body).merkle_root), None
        except BodyError as exc:
            root, malformed = b"", exc
        for index, raw in enumerate(envelopes):
            try:
                header = parse(raw).header
            except EnvelopeError:
                continue
            if header.sender != peer:
                continue
            if malformed is not None:  # only a receiver that holds one of peer's envelopes matters
                raise AuditError(f"{shown}: peer {receiver} block {block.index} (round {round}): {malformed}; "
                                 f"run `d2ora ledger verify`")
            path_hashes = inclusion_proof(leaves, index)
            if not verify_inclusion(leaves[index], index, len(leaves), path_hashes, root):
                raise AuditError(f"{shown}: peer {receiver} block {block.index} (round {round}): envelope {index} is not "
                                 f"under the block's merkle_root; run `d2ora ledger verify`")
            proofs.append({
                "receiver": receiver, "sender": peer, "round": round, "step": header.step,
                "ledger": shown, "block": block.index, "block_hash": block.hash,
                "leaf_index": index, "tree_size": len(leaves), "merkle_root": root.hex(),
                "leaf": leaves[index].hex(), "envelope": raw.hex(), "audit_path": [h.hex() for h in path_hashes],
            })
    return proofs


def rejection_summary(rejections: Iterable[tuple[int, Rejection]]) -> dict[str, dict[str, int]]:
    """sender -> check -> count, from ``(receiver, rejection)`` pairs, in the shape of summary.json's
    ``rejected_by_sender`` (string sender keys; see :func:`d2ora.trust.rejections.rejected_by_sender`)."""
    return rejected_by_sender((r.sender, r.check, 1) for _, r in rejections)
