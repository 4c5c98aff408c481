"""PeerModel: P peers' adapters held as stacks over one shared frozen model.

``PeerModel(model, peers)`` turns every ``DoRALinear`` of an attached model into a
``StackedDoRALinear`` and every ``modules_to_save`` Linear into a ``StackedLinear``, in place.
Batches are peer-major (rows ``[k·b, (k+1)·b)`` are peer k's). Messages and checkpoints read and
write the stacks as one flat row per peer (:meth:`flat` / :meth:`load_flat`, in the order of
:meth:`layout`); :meth:`peer_view` shows one peer as an ordinary attached model (to evaluate it
alone, or to save its PEFT-format adapter with ``save_adapter``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from d2ora.dora.attach import attached_config, dora_layers, resolve_modules_to_save, set_submodule
from d2ora.dora.layer import reusing_row_norms
from d2ora.dora.stacked import StackedDoRALinear, StackedLinear
from d2ora.engine.layout import AdapterLayout
from d2ora.mixers.base import LayerStack


class BaseWeights(Mapping[str, torch.Tensor]):
    """Adapted layers' frozen W0 ``(out, in)`` by name, read at each access: a dense layer's weight
    as it is (a view, no copy); a quantized layer's dequantized then, and let go once the caller is
    done with it. A mixer that works layer by layer (DoRA-exact) so never holds a 4-bit base dense
    all at once, which for an 8B model would be 16 GB in bf16."""

    def __init__(self, layers: Mapping[str, StackedDoRALinear]) -> None:
        self._layers = layers

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._layers[name].weight0

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)


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
        self._layout: AdapterLayout | None = None

    def _stacked(self) -> dict[str, StackedDoRALinear | StackedLinear]:
        return {**self.layers, **self.heads}

    def stacked_parameters(self) -> list[nn.Parameter]:
        """The peers' own tensors, each ``(P, ...)``: m, A, B and heads (not the shared frozen base
        layers the stacks hold)."""
        return [p for m in self._stacked().values() for p in m.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def serving(self, group: slice) -> Iterator[nn.Module]:
        """Forward passes inside serve only the peers in ``group`` (peer groups bound activations).

        Inside, each DoRA layer computes its row norms once and reuses them while its adapter is
        unchanged (greedy decoding, evaluation, checkpointed replays, accumulated micro-batches):
        no optimizer may step inside (the trainer steps after leaving)."""
        previous = {name: m.active for name, m in self._stacked().items()}
        for m in self._stacked().values():
            m.active = group
        try:
            with reusing_row_norms(self.layers.values()):
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

    def named_stacked(self) -> list[tuple[str, str, str, nn.Parameter]]:
        """``(module, kind, name, parameter)`` for every stacked tensor, in the flat layout's order."""
        named: list[tuple[str, str, str, nn.Parameter]] = []
        for module, layer in self.layers.items():
            for pname in ("lora_A", "lora_B", "lora_magnitude_vector"):
                param = getattr(layer, pname)
                if param is not None:
                    named.append((module, pname, pname, param))
        for module, head in self.heads.items():
            named.extend((module, "dense", pname, param) for pname, param in head.named_parameters())
        return named

    def layout(self) -> AdapterLayout:
        """How one peer's adapter flattens to one vector (messages, checkpoints, the monitor)."""
        if self._layout is None:
            named = self.named_stacked()
            dtypes = {p.dtype for *_, p in named}
            if len(dtypes) != 1:
                raise ValueError(f"stacked adapter tensors mix dtypes {sorted(map(str, dtypes))}; cast the adapter to one dtype")
            self._layout = AdapterLayout.build(
                [(m, k, n, tuple(p.shape[1:])) for m, k, n, p in named],
                {name: layer.scaling for name, layer in self.layers.items()},
                dtypes.pop(),
            )
        return self._layout

    def flat(self) -> torch.Tensor:
        """Every peer's adapter as one row: ``(P, numel)``, a detached copy."""
        return self.layout().flatten({f"{m}.{n}": p for m, _, n, p in self.named_stacked()}, self.peers)

    @torch.no_grad()
    def load_flat(self, flat: torch.Tensor, rows: slice | None = None) -> None:
        """Write ``(len(rows), numel)`` flat adapters into peers ``rows`` (all by default), in place
        (the same tensors, so the optimizer keeps them)."""
        rows = slice(0, self.peers) if rows is None else rows
        views = self.layout().views(flat)
        for module, _, pname, param in self.named_stacked():
            param[rows].copy_(views[f"{module}.{pname}"])

    def stacks(self) -> tuple[dict[str, LayerStack], dict[str, torch.Tensor]]:
        """The stacks as ``(P, ...)`` mixer tensors (detached views): adapted layers and heads."""
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
        return layers, dense

    def base_weights(self) -> BaseWeights:
        """Every adapted layer's frozen W0 ``(out, in)`` by name (shared by all peers; for DoRA-exact
        mixing), read when asked: see :class:`BaseWeights`."""
        return BaseWeights(self.layers)

    @contextlib.contextmanager
    def holding(self, peer: int, flat: torch.Tensor) -> Iterator[PeerModel]:
        """Peer ``peer`` temporarily holds the flat adapter ``flat`` (numel,); its own comes back after."""
        saved = self.flat()[peer : peer + 1].clone()
        self.load_flat(flat.reshape(1, -1), slice(peer, peer + 1))
        try:
            yield self
        finally:
            self.load_flat(saved, slice(peer, peer + 1))
