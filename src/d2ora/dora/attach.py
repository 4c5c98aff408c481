"""Model surgery: put DoRALinear around the target layers of any transformers model, and take it off."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from d2ora.dora.config import DoRAConfig
from d2ora.dora.layer import SUPPORTED_BASE_TYPES, DoRALinear, base_shape

ALL_LINEAR = "all-linear"
_CONFIG_ATTR = "_d2ora_config"


class AttachError(ValueError):
    """A target name, rank or layer type that cannot be adapted."""


@dataclass
class AttachReport:
    """What :func:`attach` did, with the parameter counts users compare methods by."""

    adapted: list[str]
    modules_to_save: list[str]
    trainable_params: int
    total_params: int
    method: str = "dora"
    per_module_rank: dict[str, int] = field(default_factory=dict)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    def summary(self) -> str:
        return (
            f"{self.method.upper()} on {len(self.adapted)} layers"
            + (f" + {len(self.modules_to_save)} saved modules" if self.modules_to_save else "")
            + f": trainable {self.trainable_params:,} / {self.total_params:,} params ({self.trainable_percent:.3f}%)"
        )


def name_matches(module_name: str, target: str) -> bool:
    """PEFT's list rule: the full name equals the target or ends with '.' + target."""
    return module_name == target or module_name.endswith("." + target)


def _output_layer_names(model: nn.Module) -> set[str]:
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is None:
        return set()
    return {name for name, module in model.named_modules() if module is out}


def _under_any(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def resolve_modules_to_save(model: nn.Module, names: list[str] | None) -> list[str]:
    """Full names of the modules listed in ``modules_to_save`` (None: none); an unknown name is an error."""
    all_names = [n for n, _ in model.named_modules() if n]
    resolved: list[str] = []
    for target in names or []:
        hits = [n for n in all_names if name_matches(n, target)]
        if not hits:
            raise AttachError(f"modules_to_save: no module named '{target}' in {type(model).__name__}")
        # Keep the outermost hits only (a name can match a module and, by suffix, none of its children).
        resolved.extend(h for h in hits if h not in resolved)
    return resolved


def resolve_targets(model: nn.Module, config: DoRAConfig) -> list[str]:
    """Full names of the layers to adapt, validated. Errors name the offending target or module."""
    saved = resolve_modules_to_save(model, config.modules_to_save)
    named = [(n, m) for n, m in model.named_modules() if n]
    targets = config.target_modules

    if targets == ALL_LINEAR or targets == [ALL_LINEAR]:
        excluded = _output_layer_names(model)
        chosen = [
            n for n, m in named
            if isinstance(m, SUPPORTED_BASE_TYPES) and n not in excluded and not _under_any(n, saved)
        ]
        if not chosen:
            raise AttachError(f"target_modules='all-linear': {type(model).__name__} has no Linear/Conv1D layers to adapt")
        return chosen

    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as exc:
            raise AttachError(f"target_modules regex '{targets}' is invalid: {exc}") from exc
        chosen = [n for n, _ in named if pattern.fullmatch(n)]
        if not chosen:
            raise AttachError(f"target_modules regex '{targets}' matches no module of {type(model).__name__}")
    else:
        chosen = []
        for target in targets:
            hits = [n for n, _ in named if name_matches(n, target)]
            if not hits:
                raise AttachError(f"target_modules: no module named '{target}' in {type(model).__name__}")
            chosen.extend(h for h in hits if h not in chosen)

    modules = dict(named)
    for name in chosen:
        module = modules[name]
        if isinstance(module, DoRALinear):
            raise AttachError(f"module '{name}' already has a d2ora adapter; call detach() first")
        if not isinstance(module, SUPPORTED_BASE_TYPES):
            raise AttachError(
                f"module '{name}' is a {type(module).__name__}; d2ora adapts nn.Linear and transformers Conv1D only"
            )
        if _under_any(name, saved):
            raise AttachError(f"module '{name}' is both a target and inside modules_to_save; pick one")
    return chosen


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), counting shared (tied) parameters once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def attach(model: nn.Module, config: DoRAConfig, ranks: dict[str, int] | None = None,
           alphas: dict[str, float] | None = None) -> AttachReport:
    """Wrap the target layers of ``model`` in place with DoRALinear; freeze all else but modules_to_save.

    ``ranks`` / ``alphas`` override r / alpha for given full module names (PEFT's rank_pattern and
    alpha_pattern, used when loading files). Everything is validated before the model is touched.
    """
    targets = resolve_targets(model, config)
    saved = resolve_modules_to_save(model, config.modules_to_save)
    ranks = ranks or {}
    alphas = alphas or {}
    for name in targets:
        out_f, in_f = base_shape(model.get_submodule(name))
        r = ranks.get(name, config.r)
        if not 0 < r <= min(in_f, out_f):
            raise AttachError(f"module '{name}' ({in_f} -> {out_f}): rank r={r} must be between 1 and {min(in_f, out_f)}")

    generator = None
    if config.init_seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(config.init_seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        base = model.get_submodule(name)
        layer = DoRALinear(
            base,
            r=ranks.get(name, config.r),
            alpha=alphas.get(name, config.alpha),
            dropout=config.dropout,
            use_rslora=config.use_rslora,
            use_dora=config.use_dora,
            generator=generator if base.weight.device.type == "cpu" else None,
        )
        set_submodule(model, name, layer)
    for name in saved:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    setattr(model, _CONFIG_ATTR, config)
    trainable, total = count_params(model)
    return AttachReport(
        adapted=targets,
        modules_to_save=saved,
        trainable_params=trainable,
        total_params=total,
        method="dora" if config.use_dora else "lora",
        per_module_rank={n: ranks.get(n, config.r) for n in targets},
    )


def attached_config(model: nn.Module) -> DoRAConfig:
    config = getattr(model, _CONFIG_ATTR, None)
    if config is None:
        raise AttachError(f"{type(model).__name__} has no d2ora adapter; call d2ora.attach(model, config) first")
    return config


def dora_layers(model: nn.Module) -> dict[str, DoRALinear]:
    """Every DoRALinear in ``model`` by full module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, DoRALinear)}


def merge(model: nn.Module) -> nn.Module:
    """Replace every DoRALinear by its dense merged layer, in place; the model no longer needs d2ora."""
    for name, layer in dora_layers(model).items():
        set_submodule(model, name, layer.merge())
    if hasattr(model, _CONFIG_ATTR):
        delattr(model, _CONFIG_ATTR)
    return model


def detach(model: nn.Module) -> nn.Module:
    """Put the original frozen layers back (the adapter is dropped), in place."""
    for name, layer in dora_layers(model).items():
        set_submodule(model, name, layer.base_layer)
    if hasattr(model, _CONFIG_ATTR):
        delattr(model, _CONFIG_ATTR)
    return model
