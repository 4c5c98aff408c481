"""Checkpoints of one process's peers, and exact resume.

Every ``every`` rounds each process writes ``checkpoints/rank-<r>/round-<t>/`` under a temporary
name and renames it into place when complete, then points ``latest`` at it; the newest ``keep``
are kept. A folder holds:

- ``state.safetensors``: the hosted peers' flat adapters, AdamW's moments and step counts, the
  samplers' epoch orders, torch's RNG states (CPU, and the GPU's when training there), the drift
  correction's momentum or tracking vector (``drift: qgm | kgt``) and (in the monitor's process) the
  last consensus adapter;
- ``state.json``: round counters, the scheduler, the samplers' generator states, the result-relevant
  config, the layout digest, the metrics rows so far (monitor), and the SHA-256 of the tensor file.

safetensors and JSON only: nothing is pickled, so a checkpoint from elsewhere cannot run code. A
resume takes the newest folder that verifies and warns about any newer one that does not.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from d2ora import atomic
from d2ora.engine.host import PeerHost
from d2ora.engine.loop import LoopState

TENSORS = "state.safetensors"
META = "state.json"
LATEST = "latest"
FORMAT = 1
_ROUND_DIR = re.compile(r"^round-(\d{6})$")


class CheckpointError(ValueError):
    """No usable checkpoint, or one that belongs to a different run."""


def rank_dir(output_dir: Path, rank: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"rank-{rank}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two result-relevant config dicts, sorted."""
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))


def refuse_changed_config(saved: dict[str, Any], current: dict[str, Any], what: Path) -> None:
    """A resume must run the config its checkpoint was written with (keys that cannot change results aside)."""
    differing = config_differences(saved, current)
    if differing:
        raise CheckpointError(
            f"cannot resume from {what}: the config differs in {', '.join(differing)} "
            "(only keys that cannot change results, such as eval_batch_size, may change)"
        )


@dataclass
class Restored:
    state: LoopState
    rows: list[dict[str, Any]]  # metrics rows up to the restored round (monitor's process; empty elsewhere)
    path: Path


class Checkpointer:
    """Writes and restores one process's checkpoints."""

    def __init__(self, directory: Path, host: PeerHost, config: dict[str, Any], *, every: int = 1, keep: int = 2,
                 warn: Any = print) -> None:
        if every < 1 or keep < 1:
            raise ValueError(f"checkpoint_every and keep_checkpoints must be at least 1, got {every} and {keep}")
        self.directory = Path(directory)
        self.host = host
        self.config = config
        self.every = every
        self.keep = keep
        self.warn = warn

    # ------------------------------------------------------------------------------------ write
    def _tensors(self, state: LoopState) -> dict[str, torch.Tensor]:
        host = self.host
        tensors: dict[str, torch.Tensor] = {"adapters": host.peer_model.flat().cpu().contiguous()}
        optimizer = host.trainer.optimizer
        for index, param in enumerate(host.trainer.params):
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value):
                    tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
        _, orders = host.sampler.state()
        tensors.update({f"sampler.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in orders.items()})
        tensors["rng.torch"] = torch.get_rng_state()
        if host.device.type == "cuda":  # dropout on a GPU draws from the device's generator
            tensors["rng.cuda"] = torch.cuda.get_rng_state(host.device)
        if state.consensus is not None:
            tensors["consensus"] = state.consensus.detach().cpu().contiguous()
        correction = host.trainer.correction
        if correction is not None and correction.state is not None:  # QGM's momentum / K-GT's tracking
            tensors["drift"] = correction.state.detach().cpu().contiguous()
        return tensors

    def _meta(self, state: LoopState, rows: list[dict[str, Any]] | None) -> dict[str, Any]:
        host = self.host
        scheduler = host.trainer.scheduler
        sampler_meta, _ = host.sampler.state()
        return {
            "format": FORMAT,
            "round": state.round, "samples_seen": state.samples_seen, "bytes_total": state.bytes_total,
            "elapsed_s": state.elapsed_s,
            "peer_ids": [host.peer_ids.start, host.peer_ids.stop],
            "layout": host.layout.digest(),
            "config": self.config,
            "scheduler": {"last_epoch": scheduler.last_epoch, "_step_count": scheduler._step_count,
                          "_last_lr": list(scheduler.get_last_lr()), "base_lrs": list(scheduler.base_lrs)},
            "optimizer_lrs": [group["lr"] for group in host.trainer.optimizer.param_groups],
            "sampler": sampler_meta,
            "rows": rows,
        }

    def due(self, round_index: int, last_round: int) -> bool:
        return round_index % self.every == 0 or round_index == last_round

    def save(self, state: LoopState, rows: list[dict[str, Any]] | None = None) -> Path:
        """Write round ``state.round``'s checkpoint atomically; prune old ones; return its folder."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"round-{state.round:06d}"
        staged = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=self.directory))
        try:
            save_file(self._tensors(state), str(staged / TENSORS))
            meta = self._meta(state, rows)
            meta["tensors_sha256"] = _sha256(staged / TENSORS)
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
        """Meta and tensors of one folder, verified; CheckpointError naming what is wrong."""
        try:
            meta = json.loads((folder / META).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{folder / META}: unreadable ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(f"{folder / META}: not a d2ora checkpoint of format {FORMAT}")
        tensor_path = folder / TENSORS
        try:
            if _sha256(tensor_path) != meta.get("tensors_sha256"):
                raise CheckpointError(f"{tensor_path}: contents do not match the SHA-256 recorded in {META}")
            tensors = load_file(str(tensor_path))
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"{tensor_path}: unreadable ({exc})") from None
        return meta, tensors

    def latest_valid(self) -> int | None:
        """The newest round whose folder verifies; warns about newer broken ones."""
        for folder in self._rounds():
            round_index = int(_ROUND_DIR.match(folder.name).group(1))
            try:
                self._read(folder)
            except CheckpointError as exc:
                self.warn(f"warning: skipping checkpoint {folder.name}: {exc}")
                continue
            return round_index
        return None

    def restore(self, round_index: int) -> Restored:
        """Load round ``round_index`` into the host; refuse one from a different run or config."""
        folder = self.directory / f"round-{round_index:06d}"
        meta, tensors = self._read(folder)
        host = self.host
        refuse_changed_config(meta.get("config") or {}, self.config, folder)
        if meta["peer_ids"] != [host.peer_ids.start, host.peer_ids.stop]:
            raise CheckpointError(f"{folder} holds peers {meta['peer_ids']}, this process hosts {[host.peer_ids.start, host.peer_ids.stop]}")
        if meta["layout"] != host.layout.digest():
            raise CheckpointError(f"{folder} was written for a different adapter layout (model, targets or rank)")
        host.peer_model.load_flat(tensors["adapters"].to(host.device))
        optimizer = host.trainer.optimizer
        optimizer.state.clear()
        # Fused / capturable AdamW keep the step count on the parameter's device, the others on the CPU.
        on_device = bool(optimizer.defaults.get("fused") or optimizer.defaults.get("capturable"))
        for index, param in enumerate(host.trainer.params):
            entries = {key.split(".", 2)[2]: t for key, t in tensors.items() if key.startswith(f"optimizer.{index}.")}
            if entries:
                optimizer.state[param] = {k: v.to(param.device) if (k != "step" or on_device) else v for k, v in entries.items()}
        for group, lr in zip(optimizer.param_groups, meta["optimizer_lrs"]):
            group["lr"] = lr
        scheduler = host.trainer.scheduler
        for key, value in meta["scheduler"].items():
            setattr(scheduler, key, value)
        correction = host.trainer.correction
        if correction is not None and correction.state is not None:
            if "drift" not in tensors:
                raise CheckpointError(f"{folder} holds no drift-correction state ({correction.method})")
            correction.load_state(tensors["drift"])
        orders = {k.removeprefix("sampler."): v.numpy() for k, v in tensors.items() if k.startswith("sampler.")}
        host.sampler.load_state(meta["sampler"], orders)
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and host.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], host.device)
        state = LoopState(round=meta["round"], samples_seen=meta["samples_seen"], bytes_total=meta["bytes_total"],
                          elapsed_s=meta["elapsed_s"], consensus=tensors.get("consensus"))
        if state.consensus is not None:
            state.consensus = state.consensus.to(host.device)
        return Restored(state=state, rows=list(meta.get("rows") or []), path=folder)
