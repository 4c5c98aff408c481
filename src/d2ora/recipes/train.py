"""Centralised fine-tuning with a DoRA (or LoRA) adapter: the baseline the decentralised runs are compared to.

:func:`train` loads data and model, attaches the adapter, trains with AdamW, evaluates on the
validation split before training and after every epoch, on the test split at the end, and writes::

    output_dir/
      adapter/                     final adapter (PEFT format: adapter_model.safetensors + adapter_config.json)
      checkpoints/epoch-<n>/       adapter after epoch n (n = 1, 2, ...), for `d2ora analyze`
      metrics.json                 config, parameter counts, per-epoch history, test metrics (atomic writes)
      train_config.yaml            the resolved config; `d2ora train --config` on it repeats the run

The defaults (MiniLM on BBC News, 192 training and 150 validation / test examples, 3 epochs) run
in a few minutes on a 2-core CPU; set ``max_train_samples`` / ``max_eval_samples`` to null for
the full splits.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader

from d2ora import atomic
from d2ora.config_io import to_yaml
from d2ora.data.sources import (
    BBC_NEWS,
    DataSourceError,
    load_source,
    split_dataset,
    subsample,
)
from d2ora.data.tasks import Task, TaskName, make_task
from d2ora.dora.attach import AttachReport, attach
from d2ora.dora.config import DoRAConfig
from d2ora.engine.local_steps import linear_schedule
from d2ora.models import DEFAULT_MODEL, LoadedModel, check_device_name, head_modules, load_model
from d2ora.runtime_support import progress_bar, quiet_datasets, resolve_device, seed_everything

ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "train_config.yaml"


class TrainConfig(BaseModel):
    """Everything one centralised training run needs; ``d2ora train`` reads it from YAML + ``--set``."""

    model_config = ConfigDict(extra="forbid")

    # --- what to train on
    model: str | None = Field(
        None,
        description="Preset ('minilm', 'smollm2'), local folder, local .gguf file or Hub name; "
        "null picks the task's default: minilm for classification, smollm2 for causal_lm.",
    )
    task: TaskName = Field("classification", description="'classification' (accuracy) or 'causal_lm' (perplexity).")
    data: str | dict[str, list[Any]] = Field(
        BBC_NEWS,
        description="'bbc_news' (shipped), a local csv/tsv/json/jsonl/parquet/txt file (optionally .gz/.bz2/.xz/.zst), a folder of <class>/*.txt, "
        "a Hub dataset name (online), or an inline mapping of columns.",
    )
    data_split: str = Field("train", description="Split to read from a Hub dataset; d2ora then makes its own splits.")
    text_column: str = Field("text", description="Column holding the input text.")
    label_column: str = Field("label", description="Column holding the class label (classification only).")
    max_length: int = Field(128, gt=1, description="Tokens per example; longer texts are truncated.")
    val_fraction: float = Field(0.15, gt=0, lt=1, description="Share of the data held out for validation.")
    test_fraction: float = Field(0.15, gt=0, lt=1, description="Share of the data held out for the final test.")
    seed: int = Field(0, description="Seeds splits, sampling, the head and adapter init, and batch order.")
    max_train_samples: int | None = Field(
        192, gt=0, description="Cap on training examples (stratified sample) for quick runs; null uses the whole split."
    )
    max_eval_samples: int | None = Field(
        150, gt=0, description="Cap on validation and on test examples each (stratified); null uses the whole splits."
    )

    # --- the adapter
    method: Literal["dora", "lora"] = Field("dora", description="'dora' (magnitude + direction) or plain 'lora'.")
    r: int = Field(8, gt=0, description="Adapter rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input while training.")
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["all-linear"],
        description="Layers to adapt: names (suffix match), one regex string, or ['all-linear'].",
    )
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    modules_to_save: list[str] | None = Field(
        None, description="Modules trained in full and saved with the adapter; null: the new classification head (none for causal_lm)."
    )

    # --- optimisation
    epochs: int = Field(3, gt=0, description="Passes over the training set.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimiser steps in all (null: no cap).")
    batch_size: int = Field(16, gt=0, description="Training examples per optimiser step.")
    eval_batch_size: int = Field(64, gt=0, description="Examples per evaluation batch.")
    lr: float = Field(2e-3, gt=0, description="AdamW peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on matrices (never on biases, norms or DoRA magnitudes).")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps with linear warm-up; the rest decays linearly to 0.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this (null: no clipping).")

    # --- where things go
    output_dir: Path = Field(Path("runs/train"), description="Folder for the adapter, checkpoints and metrics.json.")
    save_checkpoints: bool = Field(True, description="Save the adapter after every epoch under checkpoints/epoch-<n>.")
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        return check_device_name(value)

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> TrainConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} leaves no training data")
        return self

    @property
    def model_name(self) -> str:
        """The model to load: the given one, or the task's default."""
        return self.model or DEFAULT_MODEL[self.task]

    def dora_config(self, modules_to_save: list[str]) -> DoRAConfig:
        return DoRAConfig(
            r=self.r, alpha=self.alpha, dropout=self.dropout, target_modules=self.target_modules,
            modules_to_save=modules_to_save, use_rslora=self.use_rslora, use_dora=self.method == "dora",
            init_seed=self.seed,
        )


# --------------------------------------------------------------------------------------------- setup
def prepare_splits(config: TrainConfig) -> dict[str, Dataset]:
    """Raw train / validation / test splits, capped as configured (stratified for classification)."""
    classify = config.task == "classification"
    raw = load_source(
        config.data, text_column=config.text_column,
        label_column=config.label_column if classify else None, split=config.data_split,
    )
    splits = split_dataset(raw, config.val_fraction, config.test_fraction, config.seed, stratify=classify)
    caps = {"train": config.max_train_samples, "validation": config.max_eval_samples, "test": config.max_eval_samples}
    return {name: subsample(splits[name], caps[name], config.seed, stratify=classify) for name in splits}


def _loader(dataset: Dataset, task: Task, tokenizer: Any, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=task.collator(tokenizer)
    )


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Decay matrices only. Decaying a DoRA magnitude (or a bias / norm scale) pulls it to 0, i.e.
    # shrinks the layer's output, instead of regularising the update.
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)


# ---------------------------------------------------------------------------------------- outputs
def _clear_stale_checkpoints(output_dir: Path) -> None:
    """Drop epoch-* folders of an earlier run: a shorter re-run must not leave older epochs behind."""
    for old in sorted((output_dir / CHECKPOINTS_DIR).glob("epoch-*")):
        if old.is_dir():
            shutil.rmtree(old)


def _save(model: nn.Module, directory: Path, loaded: LoadedModel, task: Task) -> Path:
    from d2ora.dora.files import save_adapter

    # The hub id for a preset, not this machine's package folder: the file must load elsewhere.
    return save_adapter(
        model, directory, base_model_name_or_path=loaded.source.portable_name, task_type=task.peft_task_type
    )


def _attach_info(report: AttachReport) -> dict[str, Any]:
    return {
        "method": report.method,
        "adapted_layers": len(report.adapted),
        "modules_to_save": report.modules_to_save,
        "trainable_params": report.trainable_params,
        "total_params": report.total_params,
        "trainable_percent": report.trainable_percent,
    }


def _fmt(metrics: dict[str, float], metric: str) -> str:
    return f"{metric} {metrics[metric]:.4f}  loss {metrics['loss']:.4f}"


# ------------------------------------------------------------------------------------------- train
def train(config: TrainConfig, console: Console | None = None) -> dict[str, Any]:
    """Fine-tune ``config.model`` with an adapter on ``config.data``; returns what metrics.json holds."""
    console = console or Console()
    started = time.perf_counter()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    output_dir = Path(config.output_dir)

    with quiet_datasets():
        splits = prepare_splits(config)  # data first: a bad source fails before a model loads
        # ... and an unwritable output folder fails before the model loads and trains for minutes.
        atomic.ensure_writable_dir(output_dir)
        task = make_task(config.task, splits["train"])
        label_names = getattr(task, "label_names", None)
        loaded = load_model(config.model_name, config.task, label_names=label_names, seed=config.seed)
        saved = config.modules_to_save
        if saved is None:
            saved = head_modules(loaded) if config.task == "classification" else []
        report = attach(loaded.model, config.dora_config(saved))
        console.print(f"[bold]{config.model_name}[/bold] ({config.task}): {report.summary()}")
        tokenised = {name: task.tokenize(ds, loaded.tokenizer, config.max_length) for name, ds in splits.items()}
    if len(tokenised["train"]) == 0:
        name = config.data if isinstance(config.data, str) else "inline data"
        raise DataSourceError(f"data source '{name}' leaves no training examples after splitting and tokenising")

    model = loaded.model.to(device)
    train_loader = _loader(tokenised["train"], task, loaded.tokenizer, config.batch_size, True, config.seed)
    eval_loaders = {
        name: _loader(tokenised[name], task, loaded.tokenizer, config.eval_batch_size, False, config.seed)
        for name in ("validation", "test")
    }
    steps_per_epoch = len(train_loader)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    optimizer = _optimizer(model, config)
    scheduler = linear_schedule(optimizer, total_steps, config.warmup_ratio)
    console.print(
        f"data: {len(tokenised['train'])} train / {len(tokenised['validation'])} validation / "
        f"{len(tokenised['test'])} test examples; {total_steps} steps on {device}"
    )

    _clear_stale_checkpoints(output_dir)
    atomic.write_text(output_dir / CONFIG_FILE, to_yaml(config))
    result: dict[str, Any] = {
        "config": config.model_dump(mode="json"),
        "model": config.model_name,
        "model_path": loaded.source.path,
        "task": config.task,
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "label_names": label_names,
        "attach": _attach_info(report),
        "examples": {name: len(ds) for name, ds in tokenised.items()},
        "device": str(device),
        "history": [],
        "test": None,
        "finished": False,
    }

    def record_epoch(epoch: int, step: int, train_loss: float | None) -> None:
        val = task.evaluate(model, eval_loaders["validation"], device)
        result["history"].append({"epoch": epoch, "step": step, "train_loss": train_loss, "validation": val})
        loss_text = f"train loss {train_loss:.4f}  " if train_loss is not None else ""
        console.print(f"epoch {epoch}: {loss_text}validation {_fmt(val, task.metric)}")
        # No epoch-0 checkpoint: it is the base model itself (B = 0), a degenerate point for analyze.
        if config.save_checkpoints and epoch > 0:
            _save(model, output_dir / CHECKPOINTS_DIR / f"epoch-{epoch}", loaded, task)
        result["runtime_s"] = time.perf_counter() - started
        atomic.write_json(output_dir / METRICS_FILE, result)

    record_epoch(0, 0, None)
    step = 0
    model.train()
    with progress_bar(console) as progress:
        bar = progress.add_task("training", total=total_steps, loss="-")
        for epoch in range(1, config.epochs + 1):
            loss_sum, batches = 0.0, 0
            for batch in train_loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                loss = task.loss(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                step += 1
                loss_sum += loss.item()
                batches += 1
                progress.update(bar, advance=1, description=f"epoch {epoch}/{config.epochs}", loss=f"{loss.item():.4f}")
                if step >= total_steps:
                    break
            record_epoch(epoch, step, loss_sum / max(batches, 1))
            if step >= total_steps:
                break

    test = task.evaluate(model, eval_loaders["test"], device)
    console.print(f"test: {_fmt(test, task.metric)}")
    adapter_dir = _save(model, output_dir / ADAPTER_DIR, loaded, task)
    result.update(
        test=test, steps=step, finished=True, runtime_s=time.perf_counter() - started,
        adapter_dir=str(adapter_dir), output_dir=str(output_dir),
    )
    atomic.write_json(output_dir / METRICS_FILE, result)
    console.print(f"adapter saved to {adapter_dir}; metrics in {output_dir / METRICS_FILE} ({result['runtime_s']:.0f} s)")
    return result
