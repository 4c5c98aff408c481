"""DoRAConfig: which layers get an adapter, and how big it is."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class DoRAConfig(BaseModel):
    """Options of one adapter set, named after PEFT's ``LoraConfig`` where they mean the same."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(8, gt=0, description="Rank of B (out x r) and A (r x in); at most min(in, out) of each layer.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the low-rank update is scaled by s = alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the low-rank path's input while training.")
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["all-linear"],
        description=(
            "Layers to adapt, as PEFT takes them: a list of names, each matching a module whose full "
            "name equals it or ends with '.' + it; a single string is a regex matched against the "
            "whole module name; 'all-linear' means every Linear/Conv1D except the output layer and "
            "modules_to_save."
        ),
    )
    modules_to_save: list[str] | None = Field(
        None,
        description="Modules trained in full and saved with the adapter (e.g. a classification head), matched like "
        "target names. None: none here; d2ora's recipes read a config's null as 'the task's new head'.",
    )
    use_rslora: bool = Field(False, description="Rank-stabilised scaling s = alpha / sqrt(r) (arXiv 2312.03732).")
    use_dora: bool = Field(True, description="False gives plain LoRA: the same layer with the magnitude switched off.")
    init_seed: int | None = Field(None, description="Seed for A's Kaiming-uniform init; None uses the global RNG.")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not value:
            raise ValueError("target_modules is empty: name at least one layer, a regex, or 'all-linear'")
        if isinstance(value, str) and not value.strip():
            raise ValueError("target_modules is an empty string")
        return value
