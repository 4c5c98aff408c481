"""Centralised fine-tuning with a DoRA (or LoRA) adapter: the baseline the decentralised runs are compared to.

:func:`train` loads data and model, attaches the adapter, trains with AdamW, evaluates on the
validation split before training and after every epoch, on the test split at the end, and writes::

    output_dir/
      adapter/                     final adapter (PEFT format: adapter_model.safetensors + adapter_config.json)
      checkpoints/epoch-<n>/       adapter after epoch n (n = 1, 2, ...), for `d2ora analyze`
      metrics.json                 config, parameter counts, per-epoch history, test metrics (atomic writes)
      train_config.yaml            the resolved config; `d2ora train --config` on it repeats the run

The defaults (MiniLM on BBC News, 192 training and 150 validation / test examples, 3 epochs) run
in a few minutes on a 2-core CPU; set ``data.max_train_samples``, ``data.max_val_samples`` and
``data.max_test_samples`` to null for the full splits.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, ClassVar

import torch
from datasets import Dataset
from pydantic import Field, model_validator
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader

from d2ora import atomic
from d2ora.activation_checkpointing import enable_checkpointing
from d2ora.config_io import to_yaml
from d2ora.data.sft import load_sft_source
from d2ora.data.sft_task import SFT, SFTTask
from d2ora.data.sources import DataSourceError, load_source, split_dataset, subsample
from d2ora.data.tasks import Task, make_task
from d2ora.dora.attach import AttachReport, attach, dora_layers
from d2ora.dora.config import DoRAConfig
from d2ora.models import LoadedModel, base_autocast, head_modules, keep_masters_fp32, load_model, resolve_base_dtype
from d2ora.optim import adamw_groups, linear_schedule, micro_batch_weights, micro_batches
from d2ora.recipes.sections import DataSection, ModelSection, OptimSection, RunSection, SectionedConfig, adapter_for
from d2ora.runtime_support import progress_bar, quiet_datasets, resolve_device, seed_everything

ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "train_config.yaml"


class TrainDataSection(DataSection):
    """The data of a centralised run: train, validation and test splits."""

    val_fraction: float = Field(0.15, gt=0, lt=1, description="Share of the data held out for validation.")
    max_train_samples: int | None = Field(192, gt=0, description="Cap on training examples (stratified sample) for quick runs; null uses the whole split.")
    max_val_samples: int | None = Field(150, gt=0, description="Cap on validation examples (stratified); null uses the whole split.")

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> TrainDataSection:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} leaves no training data")
        return self


class TrainRunSection(RunSection):
    """How long to train, and where things go."""

    epochs: int = Field(3, gt=0, description="Passes over the training set.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimiser steps in all (null: no cap).")
    eval_batch_size: int = Field(64, gt=0, description="Examples per evaluation batch.")
    output_dir: Path = Field(Path("runs/train"), description="Folder for the adapter, checkpoints and metrics.json.")
    save_checkpoints: bool = Field(True, description="Save the adapter after every epoch under checkpoints/epoch-<n>.")


class TrainConfig(SectionedConfig):
    """Everything one centralised training run needs; ``d2ora train`` reads it from YAML + ``--set``.

    ``data``, ``model``, ``adapter`` and ``optim`` are the sections ``d2ora simulate`` has too; only
    the defaults differ (adapter dropout 0.05, batch 16, 10% warm-up, the base's own dropout on)."""

    data: TrainDataSection = Field(default_factory=TrainDataSection, description="The data and its splits.")
    model: ModelSection = Field(default_factory=lambda: ModelSection(base_dropout=True), description="The frozen base model.")
    adapter: DoRAConfig = Field(default_factory=lambda: DoRAConfig(dropout=0.05), description="The adapter (modules_to_save null: the task's head; init_seed null: run.seed).")
    optim: OptimSection = Field(default_factory=lambda: OptimSection(batch_size=16, warmup_ratio=0.1), description="AdamW.")
    run: TrainRunSection = Field(default_factory=TrainRunSection, description="Epochs, outputs, device, seed.")

    moved_keys: ClassVar[dict[str, str | tuple[str, ...]]] = {
        "model": "model.name", "task": "model.task",
        "data": "data.source", "data_split": "data.split",
        **{k: f"data.{k}" for k in ("text_column", "label_column", "max_length", "val_fraction", "test_fraction",
                                    "max_train_samples")},
        "max_eval_samples": ("data.max_val_samples", "data.max_test_samples"),
        "method": "adapter.use_dora",
        **{k: f"adapter.{k}" for k in ("r", "alpha", "dropout", "target_modules", "use_rslora", "modules_to_save")},
        **{k: f"optim.{k}" for k in ("batch_size", "lr", "weight_decay", "warmup_ratio", "max_grad_norm")},
        **{k: f"run.{k}" for k in ("seed", "epochs", "max_steps", "eval_batch_size", "output_dir", "save_checkpoints",
                                   "device")},
    }

    @property
    def model_name(self) -> str:
        """The model to load: the given one, or the task's default."""
        return self.model.resolved_name


# --------------------------------------------------------------------------------------------- setup
def prepare_splits(config: TrainConfig) -> dict[str, Dataset]:
    """Raw train / validation / test splits, capped as configured (stratified for classification)."""
    data, seed = config.data, config.run.seed
    classify = config.model.task == "classification"
    if config.model.task == SFT:  # instruction rows -> chat turns
        raw = load_sft_source(data.source, data.format, label_column=None, split=data.split)
    else:
        raw = load_source(
            data.source, text_column=data.text_column,
            label_column=data.label_column if classify else None, split=data.split,
        )
    splits = split_dataset(raw, data.val_fraction, data.test_fraction, seed, stratify=classify)
    caps = {"train": data.max_train_samples, "validation": data.max_val_samples, "test": data.max_test_samples}
    return {name: subsample(splits[name], caps[name], seed, stratify=classify) for name in splits}


def _loader(dataset: Dataset, task: Task, tokenizer: Any, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=task.collator(tokenizer)
    )


def _optimizer(model: nn.Module, optim: OptimSection) -> torch.optim.AdamW:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(adamw_groups(trainable, optim.weight_decay), lr=optim.lr)


def _train_mode(model: nn.Module, base_dropout: bool, saved_modules: list[str]) -> None:
    """Adapters (and saved modules) train; the frozen base keeps its own dropout only with
    ``model.base_dropout`` (the same rule as the peers' local steps in ``simulate``)."""
    model.train(base_dropout)
    if not base_dropout:
        for layer in dora_layers(model).values():
            layer.train()
        for name in saved_modules:
            model.get_submodule(name).train()


def _accumulated_backward(task: Task, model: nn.Module, batch: dict[str, torch.Tensor], grad_accum: int) -> torch.Tensor:
    """Backward of the batch's mean loss in ``grad_accum`` row slices (micro-batches), each slice's
    mean weighted by its share of the batch's loss terms (examples, or target tokens for a causal
    LM), so the gradients add up to the whole batch's; returns the batch's mean loss (detached).
    A last batch with fewer rows than ``grad_accum`` takes one row per micro-batch."""
    rows = batch["input_ids"].shape[0]
    micro = [{k: v[part] for k, v in batch.items()} for part in micro_batches(rows, min(grad_accum, rows))]
    weights = micro_batch_weights(torch.cat([task.peer_loss_units(m, 1) for m in micro]))
    total = torch.zeros(())
    for m, weight in zip(micro, weights):
        with base_autocast(model, m["input_ids"].device):  # forward only; a null context for an fp32 base
            loss = task.loss(model, m) * float(weight)
        loss.backward()
        total += loss.detach().float().cpu()
    return total


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
    run, optim, task_name = config.run, config.optim, config.model.task
    seed_everything(run.seed)
    device = resolve_device(run.device)
    output_dir = Path(run.output_dir)

    with quiet_datasets():
        splits = prepare_splits(config)  # data first: a bad source fails before a model loads
        # ... and an unwritable output folder fails before the model loads and trains for minutes.
        atomic.ensure_writable_dir(output_dir)
        task = make_task(task_name, splits["train"], train_on_prompt=config.data.train_on_prompt)
        label_names = getattr(task, "label_names", None)
        loaded = load_model(config.model_name, task_name, label_names=label_names, seed=run.seed,
                            torch_dtype=resolve_base_dtype(config.model.base_dtype, device),
                            quantize=config.model.quantize, device=device)
        saved = config.adapter.modules_to_save
        if saved is None:
            saved = head_modules(loaded) if task_name == "classification" else []
        report = attach(loaded.model, adapter_for(config.adapter, saved, run.seed))
        keep_masters_fp32(loaded.model, report.modules_to_save)  # m, A, B are fp32 already (DoRALinear)
        console.print(f"[bold]{config.model_name}[/bold] ({task_name}): {report.summary()}")
        tokenised = {name: task.tokenize(ds, loaded.tokenizer, config.data.max_length) for name, ds in splits.items()}
    if isinstance(task, SFTTask) and task.dropped_line():
        console.print(f"[yellow]{task.dropped_line()}[/yellow]")  # once, for all three splits
    if len(tokenised["train"]) == 0:
        raise DataSourceError(f"data source '{config.data.name}' leaves no training examples after splitting and tokenising")

    model = loaded.model.to(device)
    if config.model.gradient_checkpointing:
        enable_checkpointing(model)
    train_loader = _loader(tokenised["train"], task, loaded.tokenizer, optim.batch_size, True, run.seed)
    eval_loaders = {
        name: _loader(tokenised[name], task, loaded.tokenizer, run.eval_batch_size, False, run.seed)
        for name in ("validation", "test")
    }
    steps_per_epoch = len(train_loader)
    total_steps = run.epochs * steps_per_epoch
    if run.max_steps is not None:
        total_steps = min(total_steps, run.max_steps)
    optimizer = _optimizer(model, optim)
    scheduler = linear_schedule(optimizer, total_steps, optim.warmup_ratio)
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
        "task": task_name,
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
        with base_autocast(model, device):
            val = task.evaluate(model, eval_loaders["validation"], device)
        result["history"].append({"epoch": epoch, "step": step, "train_loss": train_loss, "validation": val})
        loss_text = f"train loss {train_loss:.4f}  " if train_loss is not None else ""
        console.print(f"epoch {epoch}: {loss_text}validation {_fmt(val, task.metric)}")
        # No epoch-0 checkpoint: it is the base model itself (B = 0), a degenerate point for analyze.
        if run.save_checkpoints and epoch > 0:
            _save(model, output_dir / CHECKPOINTS_DIR / f"epoch-{epoch}", loaded, task)
        result["runtime_s"] = time.perf_counter() - started
        atomic.write_json(output_dir / METRICS_FILE, result)

    record_epoch(0, 0, None)
    step = 0
    with progress_bar(console) as progress:
        bar = progress.add_task("training", total=total_steps, loss="-")
        for epoch in range(1, run.epochs + 1):
            _train_mode(model, config.model.base_dropout, report.modules_to_save)  # evaluation switched it off
            loss_sum, batches = 0.0, 0
            for batch in train_loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                if optim.grad_accum == 1:
                    with base_autocast(model, device):  # forward only; a null context for an fp32 base
                        loss = task.loss(model, batch)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                else:
                    optimizer.zero_grad(set_to_none=True)
                    loss = _accumulated_backward(task, model, batch, optim.grad_accum)
                if optim.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], optim.max_grad_norm)
                optimizer.step()
                scheduler.step()
                step += 1
                loss_sum += loss.item()
                batches += 1
                progress.update(bar, advance=1, description=f"epoch {epoch}/{run.epochs}", loss=f"{loss.item():.4f}")
                if step >= total_steps:
                    break
            record_epoch(epoch, step, loss_sum / max(batches, 1))
            if step >= total_steps:
                break

    with base_autocast(model, device):
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
