"""One peer's adapter as one flat vector: the layout every message and checkpoint agrees on.

A peer's adapter is its slice of every stacked tensor (m, A, B of each adapted layer, and the
heads), concatenated in a fixed order. Every process builds the layout from the same model and
config, and ranks compare its digest at start, so a flat buffer needs no names on the wire.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from d2ora.mixers.base import LayerStack

#: Which tensor of a layer an entry is; "dense" for modules_to_save parameters.
KINDS = ("lora_A", "lora_B", "lora_magnitude_vector", "dense")


@dataclass(frozen=True)
class LayoutEntry:
    module: str  # the adapted layer or saved module, e.g. "encoder.layer.0.attention.self.query"
    kind: str  # one of KINDS
    name: str  # parameter name within the module ("lora_A", ..., or "weight" / "bias" for dense)
    shape: tuple[int, ...]  # one peer's shape
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def key(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class AdapterLayout:
    entries: tuple[LayoutEntry, ...]
    scalings: dict[str, float]  # adapted layer -> s
    dtype: torch.dtype

    @classmethod
    def build(cls, named: list[tuple[str, str, str, tuple[int, ...]]], scalings: dict[str, float],
              dtype: torch.dtype) -> AdapterLayout:
        """From ``(module, kind, name, per-peer shape)`` in flattening order."""
        entries, offset = [], 0
        for module, kind, name, shape in named:
            if kind not in KINDS:
                raise ValueError(f"unknown layout kind {kind!r}")
            entry = LayoutEntry(module, kind, name, tuple(int(d) for d in shape), offset)
            entries.append(entry)
            offset += entry.numel
        return cls(tuple(entries), dict(scalings), dtype)

    @property
    def numel(self) -> int:
        last = self.entries[-1] if self.entries else None
        return 0 if last is None else last.offset + last.numel

    def describe(self) -> dict:
        """A canonical description (JSON-able): what two processes must agree on."""
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "entries": [[e.module, e.kind, e.name, list(e.shape)] for e in self.entries],
            "scalings": {k: self.scalings[k] for k in sorted(self.scalings)},
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()

    def flatten(self, tensors: dict[str, torch.Tensor], lead: int) -> torch.Tensor:
        """``(lead, numel)`` from per-key ``(lead, *shape)`` tensors (``key`` = module.name)."""
        parts = [tensors[e.key].detach().reshape(lead, e.numel).to(self.dtype) for e in self.entries]
        return torch.cat(parts, dim=1) if parts else torch.empty(lead, 0, dtype=self.dtype)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-key views ``(*lead, *shape)`` into a ``(*lead, numel)`` buffer (no copies)."""
        if flat.shape[-1] != self.numel:
            raise ValueError(f"flat adapter has {flat.shape[-1]} values, the layout holds {self.numel}")
        lead = flat.shape[:-1]
        return {e.key: flat[..., e.offset : e.offset + e.numel].reshape(*lead, *e.shape) for e in self.entries}

    def unflatten(self, flat: torch.Tensor) -> tuple[dict[str, LayerStack], dict[str, torch.Tensor]]:
        """Mixer-ready stacks from a ``(*lead, numel)`` buffer: adapted layers and dense tensors."""
        views = self.views(flat)
        layers: dict[str, LayerStack] = {}
        for module, scaling in self.scalings.items():
            magnitude_key = f"{module}.lora_magnitude_vector"
            layers[module] = LayerStack(
                lora_a=views[f"{module}.lora_A"],
                lora_b=views[f"{module}.lora_B"],
                magnitude=views.get(magnitude_key),
                scaling=scaling,
            )
        dense = {e.key: views[e.key] for e in self.entries if e.kind == "dense"}
        return layers, dense

    def flatten_stacks(self, layers: dict[str, LayerStack], dense: dict[str, torch.Tensor]) -> torch.Tensor:
        """The inverse of :meth:`unflatten` for one leading dim (a mixer's output)."""
        tensors: dict[str, torch.Tensor] = dict(dense)
        lead = None
        for module, stack in layers.items():
            tensors[f"{module}.lora_A"] = stack.lora_a
            tensors[f"{module}.lora_B"] = stack.lora_b
            if stack.magnitude is not None:
                tensors[f"{module}.lora_magnitude_vector"] = stack.magnitude
            lead = stack.lora_a.shape[0]
        if lead is None:
            lead = next(iter(dense.values())).shape[0]
        return self.flatten(tensors, lead)
