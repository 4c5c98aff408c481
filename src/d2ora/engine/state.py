"""The one convention for state that outlives a round (checkpoints, exact resume).

A component that owns such state (the sampler, the trainer, the drift correction, the host's
adapters, the trust run, ...) has

- ``state_dict() -> dict[str, Any]``: a *flat* dict whose values are tensors or JSON-able values
  (numbers, strings, None, lists and dicts of those). Like torch's, it hands out the live tensors:
  copy them (:func:`snapshot`) before the component moves on if you keep them.
- ``load_state_dict(state)``: takes such a dict back, raises ValueError (or KeyError) naming what
  does not fit this component, and copies what it keeps, so the dict may be reused or dropped.

The :class:`~d2ora.engine.checkpoint.Checkpointer` files each component's entries under its name
(``trainer.optimizer.<parameter>.exp_avg``): tensors into safetensors, the rest into JSON, so a
checkpoint never needs pickle and never reads a component's private fields.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Protocol

import torch


class Stateful(Protocol):
    """What the Checkpointer needs of a component."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def split(components: Mapping[str, Stateful]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every component's entries under ``<name>.``: ``(tensors, JSON-able values)``."""
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, Any] = {}
    for name, component in components.items():
        if "." in name:  # the first dot separates the component from its own keys
            raise ValueError(f"component name {name!r} must not contain a dot")
        for key, value in component.state_dict().items():
            if torch.is_tensor(value):
                tensors[f"{name}.{key}"] = value
            else:
                values[f"{name}.{key}"] = value
    return tensors, values


def part(name: str, tensors: Mapping[str, torch.Tensor], values: Mapping[str, Any]) -> dict[str, Any]:
    """Component ``name``'s own flat dict back from :func:`split`'s two halves (empty if it saved nothing)."""
    prefix = f"{name}."
    found = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    found.update({k.removeprefix(prefix): v for k, v in values.items() if k.startswith(prefix)})
    return found


def snapshot(state: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a state dict that no longer changes with its component (tensors cloned)."""
    return {k: v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in state.items()}


class TorchRandomState:
    """torch's global generators, which dropout draws from: the CPU's, and the accelerator's when
    training on one."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        torch.set_rng_state(state["cpu"].clone())
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"].clone(), self.device)
