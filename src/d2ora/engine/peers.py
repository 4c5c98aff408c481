"""PeerModel: P peers' adapters held as stacks over one shared frozen model.

``PeerModel(model, peers)`` turns every ``DoRALinear`` of an attached model into a
``StackedDoRALinear`` and every ``modules_to_save`` Linear into a ``StackedLinear``, in place.
Batches are peer-major (rows ``[k·b, (k+1)·b)`` are peer k's). Mixers read and write the stacks
through :meth:`mix_input` / :meth:`apply`; :meth:`peer_view` shows one peer as an ordinary attached
model (to evaluate it alone, or to save its PEFT-format adapter with ``save_adapter``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from d2ora.dora.attach import attached_config, dora_layers, resolve_modules_to_save, set_submodule
from d2ora.dora.stacked import StackedDoRALinear, StackedLinear
from d2ora.mixers.base import LayerStack, MixInput, MixOutput


class PeerModel:
    """Stacks the adapters of an attached model for ``peers`` peers, all starting equal."""

    def __init__(self, model: nn.Module, peers: int) -> None:
        config = attached_config(model)
        singles = dora_layers(model)
        if not singles:
            raise ValueError(f"{type(model).__name__} has no d2ora adapter to stack; call d2ora.attach first")
        heads = resolve_modules_to_save(model, config.modules_to_save)
        # Build every stack before replacing anything, so a bad head type leaves the model as it was.
        self.layers = {name: StackedDoRALinear(layer, peers) for name, layer in singles.items()}
        self.heads = {name: StackedLinear(model.get_submodule(name), peers) for name in heads}
        for name, module in {**self.layers, **self.heads}.items():
            set_submodule(model, name, module)
        self.model = model
        self.peers = peers

    def _stacked(self) -> dict[str, StackedDoRALinear | StackedLinear]:
        return {**self.layers, **self.heads}

    def stacked_parameters(self) -> list[nn.Parameter]:
        """The peers' own tensors, each ``(P, ...)``: m, A, B and heads (not the shared frozen base
        layers the stacks hold)."""
        return [p for m in self._stacked().values() for p in m.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def serving(self, group: slice) -> Iterator[nn.Module]:
        """Forward passes inside serve only the peers in ``group`` (peer groups bound activations)."""
        previous = {name: m.active for name, m in self._stacked().items()}
        for m in self._stacked().values():
            m.active = group
        try:
            yield self.model
        finally:
            for name, m in self._stacked().items():
                m.active = previous[name]

    @contextlib.contextmanager
    def peer_view(self, k: int) -> Iterator[nn.Module]:
        """The model with peer ``k``'s adapter as plain ``DoRALinear`` layers (copies; read-only use)."""
        if not 0 <= k < self.peers:
            raise IndexError(f"peer {k} out of range 0..{self.peers - 1}")
        for name, layer in self.layers.items():
            set_submodule(self.model, name, layer.peer_layer(k))
        for name, head in self.heads.items():
            set_submodule(self.model, name, head.peer_module(k))
        try:
            yield self.model
        finally:
            for name, module in self._stacked().items():
                set_submodule(self.model, name, module)

    def mix_input(
        self, weights: torch.Tensor, layer_inputs: Callable[[int, str], torch.Tensor] | None = None
    ) -> MixInput:
        """The stacks as a mixer sees them (detached views; mixers return new tensors)."""
        layers = {
            name: LayerStack(
                lora_a=layer.lora_A.detach(),
                lora_b=layer.lora_B.detach(),
                magnitude=layer.lora_magnitude_vector.detach() if layer.use_dora else None,
                scaling=layer.scaling,
            )
            for name, layer in self.layers.items()
        }
        dense = {
            f"{name}.{pname}": param.detach()
            for name, head in self.heads.items()
            for pname, param in head.named_parameters()
        }
        return MixInput(layers=layers, dense=dense, weights=weights, layer_inputs=layer_inputs)

    @torch.no_grad()
    def apply(self, out: MixOutput) -> None:
        """Write a mixer's result back into the stacked parameters (same tensors, so optimizers keep them)."""
        for name, stack in out.layers.items():
            layer = self.layers[name]
            layer.lora_A.copy_(stack.lora_a)
            layer.lora_B.copy_(stack.lora_b)
            if layer.use_dora:
                layer.lora_magnitude_vector.copy_(stack.magnitude)
        for key, value in out.dense.items():
            head_name, _, pname = key.rpartition(".")
            getattr(self.heads[head_name], pname).copy_(value)
