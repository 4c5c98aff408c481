"""Starting, checking and stopping a torch.distributed job of d2ora peers.

Every process calls :func:`start` (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT). gloo on CPU; NCCL when the device is a GPU. Agreement checks (:func:`agree`)
compare SHA-256 digests as tensors and, on a mismatch, exchange the JSON text as raw bytes to name
what differs: no object collective, nothing pickled.

Failures: when a wait fails, the process that waited may only see a symptom (its neighbour is
itself stuck waiting for a third one). Every process therefore beats a counter in the rendezvous
store once a second from a background thread; a failed wait looks for the processes whose
counters stopped and names them. A process that fails for another reason (a diverged peer) writes
its line into the store, and the others report that line instead of their own symptom.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

FAILURE_KEY = "failure"
HEARTBEAT_S = 1.0


class DistributedSetupError(RuntimeError):
    """A job that cannot start: missing torchrun variables, disagreeing processes."""


@dataclass
class Group:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    timeout: timedelta
    store: dist.Store
    #: Names a process in messages; the recipe sets it once it knows which peers each one hosts.
    describe: Callable[[int], str] = field(default=lambda rank: f"process {rank}")
    _stop_beat: threading.Event = field(default_factory=threading.Event)

    @property
    def is_root(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise DistributedSetupError(
            f"environment variable {name} is not set: start d2ora peer under torchrun (or d2ora launch)"
        )
    return int(value)


def start(timeout_s: float, device_name: str = "auto") -> Group:
    """Join the job: rendezvous through MASTER_ADDR:MASTER_PORT, then one process group."""
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            _env_int(name)  # raises the clear error
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto":
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    # The public env:// rendezvous gives the same store torchrun's workers use; keeping a handle on
    # it lets a failing process leave its reason for the others.
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    # torchrun keeps one store across --max-restarts attempts: a restarted job must not read the
    # failed attempt's keys (gloo would connect to the dead processes' addresses).
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefix = f"d2ora/attempt-{attempt}/"
    dist.init_process_group(backend, store=dist.PrefixStore(prefix + "pg/", store), rank=rank, world_size=world_size,
                            timeout=timeout)
    group = Group(rank, world_size, local_rank, backend, device, timeout, dist.PrefixStore(prefix, store))
    # Its own store connection: the beat thread must never interleave with the main thread's calls.
    beat_store = dist.PrefixStore(prefix, dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                                        is_master=False, timeout=timeout))
    threading.Thread(target=_beat, args=(beat_store, rank, group._stop_beat), daemon=True, name="d2ora-heartbeat").start()
    return group


def _beat(store: dist.Store, rank: int, stop_event: threading.Event) -> None:
    while not stop_event.is_set():
        try:
            store.add(f"beat/{rank}", 1)
        except Exception:  # noqa: BLE001 - the job is ending; a missing beat is what it would report anyway
            return
        stop_event.wait(HEARTBEAT_S)


def stop(group: Group | None) -> None:
    if group is not None:
        group._stop_beat.set()
        if dist.is_initialized():
            dist.destroy_process_group()


def silent_processes(group: Group, watch_s: float = 2.5 * HEARTBEAT_S) -> list[int]:
    """Processes whose heartbeat did not move for ``watch_s`` (stopped, hung or gone)."""
    try:
        before = [group.store.add(f"beat/{r}", 0) for r in range(group.world_size)]
        time.sleep(watch_s)
        after = [group.store.add(f"beat/{r}", 0) for r in range(group.world_size)]
    except Exception:  # noqa: BLE001 - store gone: nothing can be said
        return []
    return [r for r in range(group.world_size) if r != group.rank and after[r] == before[r]]


def note_failure(group: Group, message: str) -> None:
    """Leave the first failure's line for the other processes (later ones do not overwrite it)."""
    try:
        group.store.compare_set(FAILURE_KEY, "", message)
    except Exception:  # noqa: BLE001 - the store may be gone with the job; the local message still stands
        pass


def first_failure(group: Group) -> str | None:
    """The line a failing process left in the store, if any."""
    try:
        if group.store.check([FAILURE_KEY]):
            return group.store.get(FAILURE_KEY).decode()
    except Exception:  # noqa: BLE001 - store unreachable: nothing to report
        return None
    return None


def explain_timeout(group: Group, mine: str, round_index: int) -> str:
    """The line to stop with after a failed wait: another process's failure, else the silent
    processes, else what this one waited for."""
    cause = first_failure(group)
    if cause is None:
        silent = silent_processes(group)
        if silent:
            names = ", ".join(group.describe(r) for r in silent)
            cause = f"{names} stopped answering in round {round_index} ({mine})"
    cause = cause or mine
    note_failure(group, cause)
    return cause


def _digest_words(text: str) -> torch.Tensor:
    digest = hashlib.sha256(text.encode()).digest()
    return torch.frombuffer(bytearray(digest), dtype=torch.int64).clone()


def _gather_bytes(group: Group, data: bytes) -> list[bytes]:
    """Every process's ``data`` as raw bytes (length first, then a padded uint8 all_gather)."""
    device = group.device if group.backend == "nccl" else torch.device("cpu")
    length = torch.tensor([len(data)], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(group.world_size)]
    dist.all_gather(lengths, length)
    longest = int(max(t.item() for t in lengths))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    if data:
        padded[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    everyone = [torch.zeros_like(padded) for _ in range(group.world_size)]
    dist.all_gather(everyone, padded)
    return [bytes(t[: int(n.item())].cpu().tolist()) for t, n in zip(everyone, lengths)]


def agree(group: Group, what: str, payload: dict) -> None:
    """Refuse to go on unless every process holds the same ``payload`` (JSON-able): one line naming
    the first process and the keys that differ from rank 0's."""
    text = json.dumps(payload, sort_keys=True)
    device = group.device if group.backend == "nccl" else torch.device("cpu")
    mine = _digest_words(text).to(device)
    digests = [torch.zeros_like(mine) for _ in range(group.world_size)]
    dist.all_gather(digests, mine)
    if all(torch.equal(d, digests[0]) for d in digests):
        return
    texts = _gather_bytes(group, text.encode())
    reference = json.loads(texts[0])
    for rank, other in enumerate(texts):
        theirs = json.loads(other)
        if theirs != reference:
            keys = sorted(k for k in set(reference) | set(theirs) if reference.get(k) != theirs.get(k))
            raise DistributedSetupError(
                f"process {rank} runs a different {what} from process 0 (differs in: {', '.join(keys)}); "
                f"every process of a job must use the same {what}"
            )
