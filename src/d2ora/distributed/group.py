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

A process that dies (kill -9, out of memory) does not time anyone out: its sockets close and gloo
(or NCCL, or the store) raises at once in whichever torch.distributed call its neighbours are in.
Every such call runs under :func:`guarded` (or the exchange's waits), which turns the failure into
one :class:`ProcessLostError` line: who died, where (round or set-up step), and what happens next.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from d2ora.engine.group import NONCE_BYTES, differing_keys

FAILURE_KEY = "failure"
STOP_BEATS_KEY = "stop-beats"  # set by the store's host when it leaves after a failure
HEARTBEAT_S = 1.0


class DistributedSetupError(RuntimeError):
    """A job that cannot start: missing torchrun variables, disagreeing processes."""


class ProcessLostError(RuntimeError):
    """Another process of the job died or stopped answering: this one stops with one line."""


#: What a torch.distributed call raises when another process is gone: gloo a RuntimeError
#: ("Connection closed by peer", "Connection reset", a timeout) or DistBackendError, NCCL
#: DistBackendError, the store DistStoreError / DistNetworkError. All are RuntimeErrors; DistError
#: is named so the intent survives a torch that stops deriving it from RuntimeError. Caught only
#: around the calls themselves, so a bug in d2ora's own code still shows its traceback.
DIST_FAILURES: tuple[type[Exception], ...] = (dist.DistError, RuntimeError)


def _start_again() -> str:
    return "the run stops here; start it again"


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
    #: What happens after a failure (the run stops; how to continue): the recipe knows the folder.
    next_steps: Callable[[], str] = field(default=_start_again)
    #: The process whose death takes the store with it (rank 0 when no torchrun agent hosts it).
    store_host: int | None = None
    _stop_beat: threading.Event = field(default_factory=threading.Event)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def buffer_device(self) -> torch.device:
        """Where collective buffers live: the GPU under NCCL, the CPU under gloo."""
        return self.device if self.backend == "nccl" else torch.device("cpu")

    # ------------------------------------------------------ the PeerGroup seam (engine/group.py)
    def agree(self, what: str, payload: Mapping[str, Any]) -> None:
        """Every process against process 0 (:func:`agree`)."""
        agree(self, what, dict(payload))

    def resume_round(self, mine: int | None) -> int | None:
        """The newest round every process holds a valid checkpoint of (None when one has none):
        a process that is behind (it died between two checkpoints) takes everyone back to its
        round; keep_checkpoints >= 2 keeps that round everywhere, and restoring it checks it again."""
        value = torch.tensor([-1 if mine is None else mine], dtype=torch.int64, device=self.buffer_device)
        with guarded(self, "at start-up, while agreeing on the round to resume", "all_reduce"):
            dist.all_reduce(value, op=dist.ReduceOp.MIN)
        agreed = int(value.item())
        return None if agreed < 0 else agreed

    def fresh_nonce(self) -> bytes:
        """A random run nonce drawn by process 0 and broadcast as a byte tensor (no object collective)."""
        nonce = torch.frombuffer(bytearray(os.urandom(NONCE_BYTES)), dtype=torch.uint8).to(self.buffer_device)
        with guarded(self, "at start-up, while sharing the run nonce", "broadcast"):
            dist.broadcast(nonce, src=0)
        return nonce.cpu().numpy().tobytes()


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise DistributedSetupError(
            f"environment variable {name} is not set: start d2ora peer under torchrun (or d2ora launch)"
        )
    return int(value)


def process_device(device_name: str, local_rank: int) -> torch.device:
    """This process's device: ``auto`` and ``cuda`` mean GPU number LOCAL_RANK (one GPU per process,
    as NCCL needs: two processes on one GPU fail in NCCL's set-up), ``auto`` the CPU where there is
    no GPU; ``cuda:N`` is taken as written. A GPU the machine does not have is one clear line here,
    not a CUDA error in the middle of loading the model."""
    cuda_available = torch.cuda.is_available()
    if device_name == "auto" and not cuda_available:
        return torch.device("cpu")
    device = torch.device("cuda" if device_name == "auto" else device_name)
    if device.type != "cuda":
        return device
    if device.index is None:
        device = torch.device("cuda", local_rank)
    count = torch.cuda.device_count() if cuda_available else 0
    if device.index >= count:
        raise DistributedSetupError(
            f"process LOCAL_RANK={local_rank} needs GPU {device} but this machine has {count} GPU(s): start at most "
            f"{count} process(es) per machine (torchrun --nproc_per_node {max(count, 1)}), or set run.device: cpu"
        )
    return device


def start(timeout_s: float, device_name: str = "auto") -> Group:
    """Join the job: rendezvous through MASTER_ADDR:MASTER_PORT, then one process group."""
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            _env_int(name)  # raises the clear error
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = process_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    # The public env:// rendezvous gives the same store torchrun's workers use; keeping a handle on
    # it lets a failing process leave its reason for the others.
    # torchrun keeps one store across --max-restarts attempts: a restarted job must not read the
    # failed attempt's keys (gloo would connect to the dead processes' addresses).
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefix = f"d2ora/attempt-{attempt}/"
    try:
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        dist.init_process_group(backend, store=dist.PrefixStore(prefix + "pg/", store), rank=rank,
                                world_size=world_size, timeout=timeout)
    except DIST_FAILURES as exc:  # a process that never came, or died while the others joined
        raise DistributedSetupError(
            f"process {os.environ['RANK']} could not join the job at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
            f"within {timeout_s:g} s ({symptom(exc)}): every one of the {os.environ['WORLD_SIZE']} processes must start "
            "and stay up; start the job again"
        ) from None
    group = Group(rank, world_size, local_rank, backend, device, timeout, dist.PrefixStore(prefix, store))
    # env:// makes rank 0 the store's server unless torchrun's agent serves it (it outlives workers).
    group.store_host = None if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else 0
    # Its own store connection: the beat thread must never interleave with the main thread's calls.
    beat_store = dist.PrefixStore(prefix, dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                                        is_master=False, timeout=timeout))
    threading.Thread(target=_beat, args=(beat_store, rank, group._stop_beat), daemon=True, name="d2ora-heartbeat").start()
    return group


def _beat(store: dist.Store, rank: int, stop_event: threading.Event) -> None:
    while not stop_event.is_set():
        try:
            store.add(f"beat/{rank}", 1)
            if store.check([STOP_BEATS_KEY]):  # the store's host is leaving after a failure
                return
        except Exception:  # noqa: BLE001 - the job is ending; a missing beat is what it would report anyway
            return
        stop_event.wait(HEARTBEAT_S)


def _release_store(group: Group) -> None:
    """Before the process that serves the store leaves after a failure: tell every heartbeat
    thread to stop and give each one beat to read it. A beat that finds the store gone makes c10d
    print a multi-line C++ warning with a stack trace under the survivor's one-line error (that
    thread's stderr cannot be silenced without silencing the whole process)."""
    if group.store_host != group.rank:
        return
    with contextlib.suppress(Exception), _native_warnings_hidden():
        group.store.set(STOP_BEATS_KEY, "1")
        time.sleep(1.5 * HEARTBEAT_S)


def stop(group: Group | None, failed: bool = False) -> None:
    """Leave the job. After a failure the process group may be broken (a peer is gone): its
    teardown's error must not replace the line that says why the run stopped."""
    if group is not None:
        if not failed:
            # A process that finished its part (the final gathers sent) stops beating too: the
            # others must not take its silence for a death if one of them fails after it left.
            # The store may already be gone at the end of the job: then nobody is left to ask.
            with contextlib.suppress(Exception), _native_warnings_hidden():
                group.store.set(f"done/{group.rank}", "1")
        group._stop_beat.set()
        if failed:
            _release_store(group)
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except DIST_FAILURES:
                if not failed:
                    raise


@contextlib.contextmanager
def _native_warnings_hidden() -> Iterator[None]:
    """Silence file descriptor 2 while probing a store that may be gone: c10d logs a multi-line
    C++ warning with a stack trace on every failed store call, and the line this process ends with
    is the whole story. (Python's own stderr is flushed first and restored after.)"""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError):  # no fd 2 to borrow (embedded use): probe with the warnings
        yield
        return
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _silent(group: Group, watch_s: float) -> list[int] | None:
    """Processes whose heartbeat did not move for ``watch_s``; None when the store is unreachable."""
    try:
        with _native_warnings_hidden():
            before = [group.store.add(f"beat/{r}", 0) for r in range(group.world_size)]
        time.sleep(watch_s)
        with _native_warnings_hidden():
            after = [group.store.add(f"beat/{r}", 0) for r in range(group.world_size)]
            stopped = [r for r in range(group.world_size) if r != group.rank and after[r] == before[r]]
            return [r for r in stopped if not group.store.check([f"done/{r}"])]  # finished, not dead
    except Exception:  # noqa: BLE001 - store gone: the caller says what that means
        return None


def silent_processes(group: Group, watch_s: float = 2.5 * HEARTBEAT_S) -> list[int]:
    """Processes whose heartbeat did not move for ``watch_s`` (stopped, hung or gone)."""
    return _silent(group, watch_s) or []


def note_failure(group: Group, message: str) -> None:
    """Leave the first failure's line for the other processes (later ones do not overwrite it)."""
    # The store may be gone with the job; the local message still stands.
    with contextlib.suppress(Exception), _native_warnings_hidden():
        group.store.compare_set(FAILURE_KEY, "", message)


def first_failure(group: Group) -> str | None:
    """The line a failing process left in the store, if any."""
    try:
        with _native_warnings_hidden():
            if group.store.check([FAILURE_KEY]):
                return group.store.get(FAILURE_KEY).decode()
    except Exception:  # noqa: BLE001 - store unreachable: nothing to report
        return None
    return None


def where_text(where: int | str) -> str:
    """``3`` -> "in round 3"; a set-up step's own words stay as they are."""
    return f"in round {where}" if isinstance(where, int) else where


def explain_timeout(group: Group, mine: str, where: int | str, watch_s: float = 2.5 * HEARTBEAT_S) -> str:
    """The cause to stop with after a failed wait (``mine``: what this process saw): another
    process's failure line, else the processes whose heartbeat stopped, else ``mine``. The cause is
    left in the store for the others; it does not say what happens next (that is per process)."""
    cause = first_failure(group)
    if cause is None:
        silent = _silent(group, watch_s)
        # Another process may have reached its conclusion while this one watched (and stopped its
        # own heartbeat on the way out): its line names the one that failed first.
        cause = first_failure(group)
        if cause is None and silent is None and group.store_host is not None and group.store_host != group.rank:
            # The store lives in that process: with the store gone, so is it (or it stopped).
            cause = (f"{group.describe(group.store_host)} died or stopped answering {where_text(where)} "
                     f"(the job's rendezvous store, which it serves, is gone; {mine})")
        elif cause is None and silent:
            names = ", ".join(group.describe(r) for r in silent)
            cause = f"{names} died or stopped answering {where_text(where)} ({mine})"
    cause = cause or f"process {group.rank} lost the job {where_text(where)}: {mine}"
    note_failure(group, cause)
    return cause


def explain_loss(group: Group, mine: str, where: int | str) -> str:
    """The whole line: the cause, then what happens next."""
    return f"{explain_timeout(group, mine, where)}: {group.next_steps()}"


def symptom(exc: BaseException) -> str:
    """A torch.distributed error in a few words: its first line, without gloo's source path."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if line.startswith("[") and "] " in line:  # "[../third_party/gloo/.../pair.cc:534] Connection closed by peer"
        line = line.split("] ", 1)[1]
    line = line.split(". ", 1)[0].rstrip(".")  # gloo appends generic advice ("This is typically caused by ...")
    return line if len(line) <= 120 else line[:117] + "..."


@contextlib.contextmanager
def guarded(group: Group, where: int | str, doing: str) -> Iterator[None]:
    """Run torch.distributed calls; if one fails (a process died, the store went away), stop with
    :class:`ProcessLostError`'s one line instead of gloo's traceback. Keep only dist calls inside:
    a RuntimeError of d2ora's own code would otherwise be reported as a lost process."""
    try:
        yield
    except ProcessLostError:
        raise
    except DIST_FAILURES as exc:
        raise ProcessLostError(explain_loss(group, f"{doing}: {symptom(exc)}", where)) from None


def _digest_words(text: str) -> torch.Tensor:
    digest = hashlib.sha256(text.encode()).digest()
    return torch.frombuffer(bytearray(digest), dtype=torch.int64).clone()


def _gather_bytes(group: Group, data: bytes, where: str = "at start-up") -> list[bytes]:
    """Every process's ``data`` as raw bytes (length first, then a padded uint8 all_gather)."""
    device = group.device if group.backend == "nccl" else torch.device("cpu")
    length = torch.tensor([len(data)], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(group.world_size)]
    with guarded(group, where, "all_gather"):
        dist.all_gather(lengths, length)
    longest = int(max(t.item() for t in lengths))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    if data:
        padded[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    everyone = [torch.zeros_like(padded) for _ in range(group.world_size)]
    with guarded(group, where, "all_gather"):
        dist.all_gather(everyone, padded)
    return [bytes(t[: int(n.item())].cpu().tolist()) for t, n in zip(everyone, lengths)]


def agree(group: Group, what: str, payload: dict) -> None:
    """Refuse to go on unless every process holds the same ``payload`` (JSON-able): one line naming
    the first process and the keys that differ from rank 0's (:func:`~d2ora.engine.group.differing_keys`)."""
    text = json.dumps(payload, sort_keys=True)
    device = group.device if group.backend == "nccl" else torch.device("cpu")
    mine = _digest_words(text).to(device)
    digests = [torch.zeros_like(mine) for _ in range(group.world_size)]
    where = f"at start-up, while comparing the {what}"
    with guarded(group, where, "all_gather"):
        dist.all_gather(digests, mine)
    if all(torch.equal(d, digests[0]) for d in digests):
        return
    texts = _gather_bytes(group, text.encode(), where)
    reference = json.loads(texts[0])
    for rank, other in enumerate(texts):
        theirs = json.loads(other)
        if theirs != reference:
            keys = differing_keys(reference, theirs)
            raise DistributedSetupError(
                f"process {rank} runs a different {what} from process 0 (differs in: {', '.join(keys)}); "
                f"every process of a job must use the same {what}"
            )
