"""The trust layer of one process of a run: identities, the signed exchange, and the ledgers of the
peers it hosts.

Set-up (the same for ``d2ora simulate`` and ``d2ora peer``): the roster and the hosted peers'
private keys (throwaway ones for ``trust: simulated``, which never leave memory; key files for
``trust: keys``), the run id every envelope carries, and one ledger per hosted peer under
``output_dir/ledger``. Each round the signed exchange's record becomes one block per hosted peer
(what it accepted, what it rejected and why, what it sent, its adapter's digest after mixing); at
the end a final block holds the digests of the files the run saved, so ``d2ora ledger verify`` can
check any of them against the run that made it. Private keys are never written anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from d2ora.engine.exchange import Exchange, Routes
from d2ora.engine.host import PeerHost
from d2ora.recipes.session import wire_dtype
from d2ora.recipes.simulate_config import SimulateConfig
from d2ora.trust.attacks import Adversary
from d2ora.trust.checks import CHECKS, MessageChecker, Verdict
from d2ora.trust.envelope import payload_bytes, run_identity
from d2ora.trust.identity import IdentityError, Member, Roster, load_private_key, load_roster, public_key_string
from d2ora.trust.blocks import BodyError, GenesisBody, RejoinRecord
from d2ora.trust.ledger import LEDGER_DIR, Ledger, LedgerError, Rejection, file_digests, ledger_path, write_roster
from d2ora.trust.rejections import rejected_by_sender
from d2ora.trust.signed_exchange import SignedExchange, TrustRound

#: Rejections printed per round and process; the ledgers hold every one.
MAX_REJECTION_LINES = 8


def load_identities(config: SimulateConfig, hosted: Iterable[int], peers: int) -> tuple[Roster, dict[int, Ed25519PrivateKey]]:
    """The roster and the private keys of the hosted peers."""
    hosted = list(hosted)
    if config.trust.mode == "simulated":
        keys = {p: Ed25519PrivateKey.generate() for p in range(peers)}
        roster = Roster({p: Member(p, k.public_key()) for p, k in keys.items()})
        return roster, {p: keys[p] for p in hosted}
    assert config.trust.roster is not None and config.trust.keys_dir is not None  # the config validator ensures it
    roster = load_roster(config.trust.roster)
    roster.check_covers(peers)
    passphrase = None
    if config.trust.key_passphrase_env:
        value = os.environ.get(config.trust.key_passphrase_env)
        if value is None:
            raise IdentityError(f"key_passphrase_env names {config.trust.key_passphrase_env}, which is not set")
        passphrase = value.encode()
    keys = {}
    for peer in hosted:
        path = Path(config.trust.keys_dir) / f"peer-{peer}.key"
        key = load_private_key(path, passphrase)
        if public_key_string(key) != roster.members[peer].key_string:
            raise IdentityError(f"{path} is not peer {peer}'s key: its public key is not the one on the roster")
        keys[peer] = key
    return roster, keys


def config_digest(config: SimulateConfig) -> str:
    return hashlib.sha256(json.dumps(config.result_config(), sort_keys=True).encode()).hexdigest()


def folder_digests(root: Path, folders: Iterable[str]) -> dict[str, str]:
    """SHA-256 of every file under ``root/folder`` (relative paths, sorted): what a final block records."""
    files = [p.relative_to(root) for folder in folders if (root / folder).is_dir()
             for p in sorted((root / folder).rglob("*")) if p.is_file()]
    return file_digests(root, files)


def stored_nonce(output_dir: Path, hosted: Sequence[int]) -> bytes:
    """The run nonce a resumed run continues with (from a hosted peer's genesis block)."""
    path = ledger_path(output_dir, hosted[0])
    if not path.is_file():
        raise IdentityError(f"cannot resume the trust layer: {path} is missing")
    ledger = Ledger.open(path)
    try:
        genesis = GenesisBody.from_body(ledger.genesis().body)
    except BodyError as exc:
        raise LedgerError(f"cannot resume the trust layer: {path}: {exc}") from None
    finally:
        ledger.close()
    return bytes.fromhex(genesis.nonce)


class TrustRun:
    """The trust layer of the peers one process hosts."""

    def __init__(self, config: SimulateConfig, host: PeerHost, routes: Routes, output_dir: Path, roster: Roster,
                 keys: dict[int, Ed25519PrivateKey], nonce: bytes, resume_round: int | None = None,
                 warn: Callable[[str], None] | None = None) -> None:
        self.config, self.host, self.routes = config, host, routes
        self.warn = warn
        self.output_dir = output_dir
        self.roster, self.keys = roster, keys
        layout = host.layout
        self.run_id = run_identity(nonce, config_digest(config), roster.sha256, layout.digest())
        self.wire_dtype = wire_dtype(config) or layout.dtype
        (output_dir / LEDGER_DIR).mkdir(parents=True, exist_ok=True)
        if host.peer_ids.start == 0:
            write_roster(output_dir, roster)
            if resume_round is None:  # ledgers of peers this run does not have (an earlier, larger run)
                for stale in (output_dir / LEDGER_DIR).glob("peer-*.sqlite"):
                    index = stale.stem.removeprefix("peer-")
                    if index.isdigit() and int(index) >= routes.peers:
                        stale.unlink()
        self.ledgers: dict[int, Ledger] = {}
        for peer in host.peer_ids:
            path = ledger_path(output_dir, peer)
            if resume_round is not None:
                ledger = Ledger.open(path, keys[peer])
                ledger.rewind(resume_round)
            else:
                path.unlink(missing_ok=True)  # an earlier run's ledger in this folder is not this run's
                ledger = Ledger.create(path, peer, keys[peer], {
                    "peer": peer, "run_id": self.run_id.hex(), "nonce": nonce.hex(), "config_sha256": config_digest(config),
                    "roster_sha256": roster.sha256, "layout_sha256": layout.digest(),
                    "in_neighbours": routes.in_neighbours(peer),
                })
            self.ledgers[peer] = ledger
        self.rejections = torch.zeros(len(host.peer_ids), routes.peers, len(CHECKS), dtype=torch.float64)
        self.seconds = {"sign": 0.0, "verify": 0.0, "ledger": 0.0}
        self.adversary: Adversary | None = None
        if config.trust.attack not in ("none", "label_flip"):
            self.adversary = Adversary(config.trust.attack, frozenset(config.trust.byzantine), self.routes, seed=config.run.seed,
                                       scale=config.trust.attack_scale)
        self.exchange: SignedExchange | None = None

    def wrap(self, inner: Exchange, message_numel: int) -> SignedExchange:
        """``inner`` signing and checking every message of ``message_numel`` values (the share policy's)."""
        checker = MessageChecker(self.roster, self.routes, self.run_id, message_numel, self.wire_dtype,
                                 self.config.trust.max_update_norm)
        self.exchange = SignedExchange(inner, routes=self.routes, keys=self.keys, checker=checker, run_id=self.run_id,
                                       wire_dtype=self.wire_dtype, ledger_head=lambda peer: self.ledgers[peer].head,
                                       adversary=self.adversary)
        return self.exchange

    # ------------------------------------------------------------------------------ checkpoints
    # The ledgers are rewound to the checkpoint's round when the run is built (``resume_round``);
    # what else outlives a round is the rejection counts and times summary.json reports for the
    # whole run, and what the hosted Byzantine peers learnt in the last gossip step (the next
    # round's crafted and replayed messages depend on it; d2ora.engine.state's convention).
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"rejections": self.rejections, "seconds": dict(self.seconds)}
        if self.adversary is not None:
            state.update(self.adversary.state_dict())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if tuple(state["rejections"].shape) != tuple(self.rejections.shape):
            raise ValueError(f"rejection counts of shape {tuple(state['rejections'].shape)}, this process has "
                             f"{tuple(self.rejections.shape)}")
        self.rejections.copy_(state["rejections"])
        self.seconds.update({k: float(v) for k, v in state["seconds"].items()})
        if self.adversary is not None:
            self.adversary.load_state_dict({k: v for k, v in state.items() if k not in ("rejections", "seconds")})

    def after_round(self, round_index: int, rejoined: RejoinRecord | None = None, record: TrustRound | None = None) -> None:
        """One ledger block per hosted peer for the round just mixed. ``rejoined``: the round the
        (one) hosted peer came back in (the rounds it missed are named); ``record``: what the
        signed exchange recorded of the round, when the caller took it (default: take it now)."""
        assert self.exchange is not None
        tick = time.perf_counter()
        record = record if record is not None else self.exchange.take_round()
        for name in ("sign", "verify"):
            self.seconds[name] += record.seconds[name]
        flat = self.host.peer_model.flat()
        lines = []
        for k, peer in enumerate(self.host.peer_ids):
            rejected = record.rejected.get(peer, [])
            for verdict in rejected:
                self.rejections[k, verdict.sender, CHECKS.index(verdict.check)] += 1
                lines.append(f"round {round_index} step {verdict.step}: peer {peer} rejected peer {verdict.sender}'s "
                             f"message ({verdict.check}: {verdict.detail})")
            self.ledgers[peer].append_round(
                round_index, record.accepted.get(peer, []), [_rejection(v) for v in rejected], record.sent.get(peer, []),
                hashlib.sha256(payload_bytes(flat[k])).hexdigest(), **({} if rejoined is None else {"rejoined": rejoined}),
            )
        self.seconds["ledger"] += time.perf_counter() - tick
        if self.warn is not None and lines:
            shown = lines[:MAX_REJECTION_LINES]
            if len(lines) > len(shown):
                shown.append(f"... and {len(lines) - len(shown)} more rejected in round {round_index} (all in the ledgers)")
            for line in shown:
                self.warn(line)

    def finish(self, extra_files: Callable[[int], dict[str, str]] | None = None) -> None:
        """The final block of every hosted peer: the digests of the files saved for it."""
        for peer, ledger in self.ledgers.items():
            files = folder_digests(self.output_dir, [f"adapters/peer-{peer}"])
            if extra_files is not None:
                files.update(extra_files(peer))
            ledger.append_final({"files": files})

    def close(self) -> None:
        for ledger in self.ledgers.values():
            ledger.close()


def _rejection(verdict: Verdict) -> Rejection:
    return Rejection(sender=verdict.sender, step=verdict.step, check=str(verdict.check), detail=verdict.detail,
                     envelope=verdict.raw or None)


def rejection_summary(counts: torch.Tensor) -> dict[str, dict[str, int]]:
    """``(P receivers, P senders, checks)`` counts -> {sender: {check: count}} for senders with any:
    summary.json's ``rejected_by_sender``, made by the summary the ledger audit gives too."""
    per_sender = counts.sum(0)
    return rejected_by_sender((sender, CHECKS[c], int(per_sender[sender, c]))
                              for sender, c in per_sender.nonzero().tolist())
