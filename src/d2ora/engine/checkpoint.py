"""Checkpoints of one process's peers, and exact resume.

Every ``every`` rounds each process writes ``checkpoints/rank-<r>/round-<t>/`` under a temporary
name and renames it into place when complete, then points ``latest`` at it; the newest ``keep``
are kept. What goes in is the state of named components (:mod:`d2ora.engine.state`): the host's
adapters (``host``), AdamW and the scheduler (``trainer``), the samplers (``sampler``), the drift
correction (``drift``, QGM's momentum or K-GT's tracking), torch's generators (``rng``), the loop's
counters and last consensus adapter (``loop``) and whatever a recipe adds (the trust run,
``trust``). Each component's entries are filed under its name:

- ``state.safetensors``: the tensor entries (``trainer.optimizer.<parameter>.exp_avg``, ...);
- ``state.json``: the format, the result-relevant config, the metrics rows so far (monitor), the
  other entries (``state``) and the SHA-256 of the tensor file.

safetensors and JSON only: nothing is pickled, so a checkpoint from elsewhere cannot run code. A
resume takes the newest folder that verifies and warns about any newer one that does not; a
checkpoint of another format (an earlier d2ora's) is refused, naming what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from d2ora import atomic
from d2ora.engine import state as component_state
from d2ora.engine.group import differing_keys as config_differences  # keys of two result configs that differ
from d2ora.engine.loop import LoopState
from d2ora.engine.state import Stateful

TENSORS = "state.safetensors"
META = "state.json"
LATEST = "latest"
#: 2: components' state under their names (optimizer state by parameter name). 1: d2ora before that.
FORMAT = 2
_ROUND_DIR = re.compile(r"^round-(\d{6})$")
#: The loop's counters: a component every checkpoint holds.
LOOP = "loop"


class CheckpointError(ValueError):
    """No usable checkpoint, or one that belongs to a different run."""


class FormatError(CheckpointError):
    """A checkpoint of another format: not a damaged one to skip, a run this d2ora cannot continue."""


def rank_dir(output_dir: Path, rank: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"rank-{rank}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def refuse_changed_config(saved: dict[str, Any], current: dict[str, Any], what: Path) -> None:
    """A resume must run the config its checkpoint was written with (keys that cannot change results aside)."""
    differing = config_differences(saved, current)
    if differing:
        raise CheckpointError(
            f"cannot resume from {what}: the config differs in {', '.join(differing)} "
            "(only keys that cannot change results, such as eval_batch_size, may change)"
        )


def check_format(meta: Any, folder: Path) -> None:
    """Refuse a checkpoint's ``state.json`` content ``meta`` unless this d2ora wrote its format."""
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), int):
        raise CheckpointError(f"{folder / META}: not a d2ora checkpoint")
    if meta["format"] != FORMAT:
        which = "an earlier" if meta["format"] < FORMAT else "a newer"
        raise FormatError(
            f"{folder} was written by {which} d2ora (checkpoint format {meta['format']}; this one reads "
            f"format {FORMAT}) and cannot be resumed: rerun the run without --resume"
        )


def _storable(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors safetensors will write: live state may be views into a larger tensor or share
    one storage (a sender's adapter row sent to several neighbours), which it refuses; copy those."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        tensor = value.detach().cpu().contiguous()
        storage = tensor.untyped_storage()
        if tensor.numel() and (storage.data_ptr() in seen or storage.nbytes() != tensor.numel() * tensor.element_size()):
            tensor = tensor.clone()
        if tensor.numel():
            seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


@dataclass
class Restored:
    state: LoopState
    rows: list[dict[str, Any]]  # metrics rows up to the restored round (monitor's process; empty elsewhere)
    path: Path


class Checkpointer:
    """Writes and restores one process's checkpoints: the state of ``components`` (by name)."""

    def __init__(self, directory: Path, components: Mapping[str, Stateful], config: dict[str, Any], *, every: int = 1,
                 keep: int = 2, warn: Any = print) -> None:
        if every < 1 or keep < 1:
            raise ValueError(f"checkpoint_every and keep_checkpoints must be at least 1, got {every} and {keep}")
        if LOOP in components:
            raise ValueError(f"component name {LOOP!r} is the loop's own")
        self.directory = Path(directory)
        self.components: dict[str, Stateful] = dict(components)
        self.config = config
        self.every = every
        self.keep = keep
        self.warn = warn
        #: What the last :meth:`restore` read, for components added after it (:meth:`add`); let go
        #: at the first save.
        self.restored: tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None = None

    def add(self, name: str, component: Stateful) -> None:
        """Checkpoint ``component`` too; after a :meth:`restore` it is loaded from that checkpoint
        now (the trust run is built once the restored round is known: its ledgers rewind to it)."""
        if name in self.components or name == LOOP:
            raise ValueError(f"a component named {name!r} is already checkpointed")
        self.components[name] = component
        if self.restored is not None:
            self._load(name, component, *self.restored)

    # ------------------------------------------------------------------------------------ write
    def due(self, round_index: int, last_round: int) -> bool:
        return round_index % self.every == 0 or round_index == last_round

    def save(self, state: LoopState, rows: list[dict[str, Any]] | None = None) -> Path:
        """Write round ``state.round``'s checkpoint atomically; prune old ones; return its folder."""
        self.restored = None
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"round-{state.round:06d}"
        staged = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=self.directory))
        try:
            tensors, values = component_state.split({LOOP: state, **self.components})
            save_file(_storable(tensors), str(staged / TENSORS))
            meta = {"format": FORMAT, "config": self.config, "rows": rows, "state": values,
                    "tensors_sha256": _sha256(staged / TENSORS)}
            (staged / META).write_text(json.dumps(meta), encoding="utf-8")
            for path in (staged / TENSORS, staged / META):
                with open(path, "rb+") as fh:
                    os.fsync(fh.fileno())
                # mkdtemp / safetensors make 0700 / 0600; give what a plain write would under the umask.
                path.chmod(atomic.default_file_mode())
            staged.chmod(0o777 & ~atomic.current_umask())
            if final.exists():  # a re-run of the same round (resume): the new one replaces it
                shutil.rmtree(final)
            os.replace(staged, final)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        atomic.write_text(self.directory / LATEST, final.name + "\n")
        self._prune()
        return final

    def _rounds(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if p.is_dir() and _ROUND_DIR.match(p.name)]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def _prune(self) -> None:
        for old in self._rounds()[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.directory.glob(".round-*.tmp"):  # a crash mid-write leaves one behind
            shutil.rmtree(stale, ignore_errors=True)

    # ------------------------------------------------------------------------------------- read
    def _read(self, folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Meta and tensors of one folder, verified; CheckpointError naming what is wrong
        (FormatError for another format)."""
        try:
            meta = json.loads((folder / META).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{folder / META}: unreadable ({exc})") from None
        check_format(meta, folder)
        tensor_path = folder / TENSORS
        try:
            if _sha256(tensor_path) != meta.get("tensors_sha256"):
                raise CheckpointError(f"{tensor_path}: contents do not match the SHA-256 recorded in {META}")
            tensors = load_file(str(tensor_path))
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"{tensor_path}: unreadable ({exc})") from None
        return meta, tensors

    def latest_valid(self) -> int | None:
        """The newest round whose folder verifies; warns about newer broken ones. A checkpoint of
        another format is refused outright (an older one would be of that format too)."""
        for folder in self._rounds():
            round_index = int(_ROUND_DIR.match(folder.name).group(1))
            try:
                self._read(folder)
            except FormatError:
                raise
            except CheckpointError as exc:
                self.warn(f"warning: skipping checkpoint {folder.name}: {exc}")
                continue
            return round_index
        return None

    def _load(self, name: str, component: Stateful, folder: Path, tensors: dict[str, torch.Tensor],
              values: dict[str, Any]) -> None:
        try:
            component.load_state_dict(component_state.part(name, tensors, values))
        except (ValueError, KeyError) as exc:
            detail = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            raise CheckpointError(f"cannot resume from {folder}: its {name} state does not fit this run: {detail}") from None

    def restore(self, round_index: int) -> Restored:
        """Load round ``round_index`` into the components; refuse one from a different run or config."""
        folder = self.directory / f"round-{round_index:06d}"
        meta, tensors = self._read(folder)
        refuse_changed_config(meta.get("config") or {}, self.config, folder)
        values = meta.get("state") or {}
        state = LoopState()
        for name, component in {LOOP: state, **self.components}.items():
            self._load(name, component, folder, tensors, values)
        self.restored = (folder, tensors, values)
        return Restored(state=state, rows=list(meta.get("rows") or []), path=folder)
