"""Activation (gradient) checkpointing of a model's transformer blocks, independent of train/eval mode.

Each block's forward runs under ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``:
its activations are dropped after the forward and recomputed, block by block, in the backward.
Only the block's inputs are kept, so activation memory falls from O(layers x block internals) to
O(layers x hidden) plus one block's internals.

Why our own wrapper and not Hugging Face's ``gradient_checkpointing_enable``: HF checkpoints a
block only while ``block.training`` is true, and d2ora trains with the frozen base in eval mode
(``LocalTrainer._train_mode``: the base's dropout off, only adapters and heads in train mode).
Putting the blocks in train mode while keeping the base's dropout off would mean flipping
``training`` back on every attention / dropout submodule inside them, model by model (HF's
attention reads its own ``self.training`` for attention dropout). The wrapper here checkpoints
whenever gradients are being recorded, whatever the modes say, so the base's dropout stays exactly
as ``model.base_dropout`` set it, and the same code serves ``d2ora train`` and the peer-batched
``StackedDoRALinear`` layers (non-reentrant checkpointing replays the block's forward, with the
RNG state restored, so dropout masks and peer slices are the same in the replay).

The replay reads the stacked layers' ``active`` peer group, so the backward must run while the
same group is being served (``LocalTrainer.step`` does this).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

#: Marks a block whose forward this module wrapped (so enabling twice wraps once).
_WRAPPED = "_d2ora_checkpointed"
#: Keyword arguments through which HF blocks read or write a KV cache. A cache written in the forward
#: would be written again in the replay (keys appended twice), so it is dropped as HF itself does.
_CACHE_KWARGS = ("cache", "layer_past", "past_key_value", "past_key_values")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: modules HF marks as ``GradientCheckpointingLayer`` (the outermost
    ones), or else the classes the model lists in ``_no_split_modules``."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # an older transformers: only the class-name list below
        GradientCheckpointingLayer = ()  # type: ignore[assignment]
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if (GradientCheckpointingLayer and isinstance(module, GradientCheckpointingLayer)) or type(module).__name__ in names:
            blocks.append(module)
            inside.update(id(m) for m in module.modules())  # a block inside a block is replayed with it
    return blocks


def _checkpointed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():  # evaluation: nothing to replay, run the block as is (cache included)
        return forward(*args, **kwargs)
    for key in _CACHE_KWARGS:
        if kwargs.get(key) is not None:
            kwargs[key] = None
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def enable_checkpointing(model: nn.Module) -> int:
    """Checkpoint every transformer block of ``model``; returns how many blocks are wrapped.

    The wrapper is an instance attribute over the block's own forward, so module names, parameters
    and state dicts do not change (adapter files and checkpoints are the same with and without)."""
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"gradient checkpointing: found no transformer blocks in {type(model).__name__}")
    for block in blocks:
        if getattr(block, _WRAPPED, False):
            continue
        block.forward = functools.partial(_checkpointed, block.forward)  # type: ignore[method-assign]
        setattr(block, _WRAPPED, True)
    return len(blocks)


def disable_checkpointing(model: nn.Module) -> None:
    """Undo :func:`enable_checkpointing` (the blocks' own forward comes back)."""
    for block in transformer_blocks(model):
        if getattr(block, _WRAPPED, False):
            del block.forward
            delattr(block, _WRAPPED)
