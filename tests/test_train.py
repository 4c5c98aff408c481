"""recipes.train and `d2ora train`: real training runs (tiny models fast, MiniLM on BBC News slow)."""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from d2ora.config_io import load_config
from d2ora.recipes.train import TrainConfig, train
from tests.conftest import train_config

ADAPTER_FILES = {"adapter_model.safetensors", "adapter_config.json"}


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


TOPICS = {"fruit": ["apple", "banana", "cherry", "grape", "melon"], "cars": ["engine", "wheel", "brake", "road", "tyre"]}


@pytest.fixture(scope="module")
def tiny_llama_with_tokenizer(tmp_path_factory) -> str:
    """A random 2-layer Llama with a 13-word word-level tokenizer, saved together (loads like any model folder)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [w for topic in TOPICS.values() for w in topic]
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[EOS]", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=len(vocab), max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("tiny_llama_tok")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def topic_data(n: int = 120, seed: int = 0) -> dict[str, list[str]]:
    """Two easily separated topics, as an inline data mapping."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        topic = "fruit" if i % 2 else "cars"
        texts.append(" ".join(rng.choice(TOPICS[topic]) for _ in range(8)))
        labels.append(topic)
    return {"text": texts, "label": labels}


def tiny_config(model: str, out: Path, **kw) -> TrainConfig:
    base = {
        "model": model, "data": topic_data(), "max_length": 16, "epochs": 2, "batch_size": 8, "lr": 5e-3,
        "max_train_samples": None, "max_eval_samples": None, "output_dir": out, "device": "cpu", "r": 4,
    }
    base.update(kw)
    return train_config(**base)


# ------------------------------------------------------------------------------------- tiny models
def test_causal_lm_run_lowers_perplexity_and_writes_outputs(tiny_llama_with_tokenizer: str, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_llama_with_tokenizer, tmp_path, task="causal_lm", epochs=3, lr=2e-2)
    result = train(cfg, console=quiet())
    history = result["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    before, after = history[0]["validation"]["perplexity"], history[-1]["validation"]["perplexity"]
    # Random init: about the vocabulary size (13); the floor is about 5 (8 words drawn from one topic's 5).
    assert before > 10 and after < 0.75 * before
    assert result["metric"] == "perplexity" and result["test"]["perplexity"] < 0.75 * before
    assert result["attach"]["modules_to_save"] == []  # no new head for a causal LM

    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["finished"] is True and on_disk["test"] == result["test"]
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= ADAPTER_FILES
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-1", "epoch-2", "epoch-3"]
    adapter_cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["task_type"] == "CAUSAL_LM" and adapter_cfg["use_dora"] is True
    # The saved resolved config repeats the run.
    assert load_config(TrainConfig, tmp_path / "train_config.yaml", []) == cfg


def test_classification_on_llama_style_head_is_deterministic(tiny_llama_with_tokenizer: str, tmp_path: Path) -> None:
    a = train(tiny_config(tiny_llama_with_tokenizer, tmp_path / "a", method="lora"), console=quiet())
    b = train(tiny_config(tiny_llama_with_tokenizer, tmp_path / "b", method="lora"), console=quiet())
    assert a["attach"]["modules_to_save"] == ["score"] and a["attach"]["method"] == "lora"
    assert a["label_names"] == ["cars", "fruit"]
    assert a["history"] == b["history"] and a["test"] == b["test"]
    assert a["history"][0]["validation"]["accuracy"] < 0.7 and a["test"]["accuracy"] >= 0.9  # it learned the topics
    c = train(tiny_config(tiny_llama_with_tokenizer, tmp_path / "c", method="lora", seed=1), console=quiet())
    assert c["history"] != a["history"]


def test_max_steps_caps_training_and_a_rerun_clears_old_checkpoints(tiny_llama_with_tokenizer: str, tmp_path: Path) -> None:
    train(tiny_config(tiny_llama_with_tokenizer, tmp_path, epochs=3), console=quiet())
    assert len(list((tmp_path / "checkpoints").iterdir())) == 3
    result = train(tiny_config(tiny_llama_with_tokenizer, tmp_path, epochs=3, max_steps=5), console=quiet())
    assert result["steps"] == 5  # 84 train examples / 8 = 11 steps per epoch: stops inside epoch 1
    assert [h["epoch"] for h in result["history"]] == [0, 1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-1"]


# ----------------------------------------------------------------------------------------------- CLI
def _cli(args: list[str]):
    from d2ora.cli import app

    return CliRunner().invoke(app, ["train", *args])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "optim.lr=abc"], "lr (from the command line)"),
        (["--set", "optim.learning_rate=1"], "unknown key 'optim.learning_rate'"),
        (["--set", "lr=1"], "'lr' moved into a section: use optim.lr"),
        (["--method", "qlora"], "method"),
        (["--config", "/nonexistent/d2ora.yaml"], "config file not found"),
        (["--set", "data.source=/nonexistent/data.csv"], "data file not found"),
        (["--set", "lr"], "must look like key=value"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(args: list[str], needle: str) -> None:
    result = _cli(args)
    assert result.exit_code == 2, result.output
    assert needle in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "Traceback" not in result.output


def test_cli_missing_model_exits_2(tmp_path: Path) -> None:
    result = _cli(["--set", f"data.source={tmp_path / 'd.csv'}", "--set", "model.name=/nonexistent/model"])
    assert result.exit_code == 2  # the data error comes first: nothing loads a model for a bad source
    (tmp_path / "d.csv").write_text("text,label\na,x\nb,y\nc,x\nd,y\ne,x\nf,y\ng,x\nh,y\n", encoding="utf-8")
    result = _cli(["--set", f"data.source={tmp_path / 'd.csv'}", "--set", "model.name=/nonexistent/model",
                   "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 2 and "model not found: /nonexistent/model" in result.output


def _tiny_csv(folder: Path) -> Path:
    path = folder / "d.csv"
    path.write_text("text,label\na,x\nb,y\nc,x\nd,y\ne,x\nf,y\ng,x\nh,y\n", encoding="utf-8")
    return path


def _assert_one_error_line(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot write to output_dir"), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_cli_unwritable_output_dir_exits_2_with_one_line(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        result = _cli(["--set", f"data.source={_tiny_csv(tmp_path)}", "--output-dir", str(locked / "run")])
        _assert_one_error_line(result, str(locked / "run"), "Permission denied")
    finally:
        locked.chmod(0o700)
    assert not (locked / "run").exists()


def test_cli_output_dir_blocked_by_a_file_exits_2_with_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "results"
    blocker.write_text("a file, not a folder", encoding="utf-8")
    result = _cli(["--set", f"data.source={_tiny_csv(tmp_path)}", "--output-dir", str(blocker / "run")])
    _assert_one_error_line(result, str(blocker / "run"), f"'{blocker}' is a file")
    assert blocker.read_text(encoding="utf-8") == "a file, not a folder"


def test_cli_runs_a_tiny_model(tiny_llama_with_tokenizer: str, tmp_path: Path) -> None:
    data = tmp_path / "topics.jsonl"
    d = topic_data(60)
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(d["text"], d["label"])))
    result = _cli([
        "--set", f"model.name={tiny_llama_with_tokenizer}", "--set", f"data.source={data}", "--set", "run.epochs=1",
        "--set", "data.max_length=16", "--set", "run.device=cpu", "--method", "lora", "--output-dir", str(tmp_path / "out"),
    ])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["finished"] and metrics["config"]["adapter"]["use_dora"] is False and metrics["attach"]["method"] == "lora"
    assert "LORA on" in result.output and "test: accuracy" in result.output


# ------------------------------------------------------------------------------ portable base names
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # the repository the packaged files come from


def test_minilm_adapter_names_its_hub_base_not_this_machine(tmp_path: Path) -> None:
    from tests.conftest import minilm_path

    # Independent evidence that the packaged folder is that repository: its own model card says so.
    card = (Path(minilm_path()) / "README.md").read_text(encoding="utf-8")
    assert f"SentenceTransformer('{MINILM_HUB_ID}')" in card

    cfg = tiny_config("minilm", tmp_path, data=topic_data(40), epochs=1, max_steps=1)
    result = train(cfg, console=quiet())
    for folder in (tmp_path / "adapter", tmp_path / "checkpoints" / "epoch-1"):
        saved = json.loads((folder / "adapter_config.json").read_text())
        assert saved["base_model_name_or_path"] == MINILM_HUB_ID, folder
    assert result["model_path"] == minilm_path()  # metrics.json still records where it was loaded from


def test_portable_name_of_presets_and_local_models(tiny_llama_with_tokenizer: str) -> None:
    from d2ora.models import resolve_model

    assert resolve_model("minilm").portable_name == MINILM_HUB_ID
    assert resolve_model("smollm2").portable_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model(tiny_llama_with_tokenizer).portable_name == tiny_llama_with_tokenizer
    assert resolve_model("someone/some-model").portable_name == "someone/some-model"  # a Hub id stays as given


# -------------------------------------------------------------------------------- MiniLM, BBC News
@pytest.mark.slow
def test_minilm_on_bbc_news_beats_the_untrained_model(tmp_path: Path) -> None:
    from d2ora.dora.files import load_adapter
    from d2ora.models import load_model
    from d2ora.recipes.train import prepare_splits

    cfg = train_config(
        max_train_samples=160, max_eval_samples=100, max_length=64, epochs=2, batch_size=8, output_dir=tmp_path,
        device="cpu",
    )
    result = train(cfg, console=quiet())
    before = result["history"][0]["validation"]["accuracy"]
    after = result["history"][-1]["validation"]["accuracy"]
    assert before < 0.45  # a random head on 5 balanced-ish classes
    assert after >= before + 0.4 and after >= 0.8
    assert result["test"]["accuracy"] >= 0.8
    assert result["attach"]["modules_to_save"] == ["classifier"] and result["attach"]["method"] == "dora"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-1", "epoch-2"]

    # The saved adapter restores the trained model: a fresh base + load_adapter gives the same test accuracy.
    from torch.utils.data import DataLoader

    from d2ora.data.tasks import make_task

    splits = prepare_splits(cfg)
    task = make_task("classification", splits["train"])
    loaded = load_model("minilm", "classification", label_names=task.label_names, seed=999)  # a different head
    load_adapter(loaded.model, tmp_path / "adapter")
    test = task.tokenize(splits["test"], loaded.tokenizer, cfg.data.max_length)
    loader = DataLoader(test, batch_size=64, collate_fn=task.collator(loaded.tokenizer))
    assert task.evaluate(loaded.model, loader)["accuracy"] == pytest.approx(result["test"]["accuracy"])


@pytest.mark.parametrize("base_dropout", [False, True])
def test_train_mode_keeps_the_base_in_eval_unless_asked(tiny_gpt2_dir: str, base_dropout: bool) -> None:
    """model.base_dropout: false runs the frozen base in eval mode (its dropout off) while the
    adapters and saved modules train, the same rule as the peers' local steps in simulate."""
    from transformers import GPT2LMHeadModel

    from d2ora import DoRAConfig, attach
    from d2ora.dora.attach import dora_layers
    from d2ora.recipes.train import _train_mode

    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    attach(model, DoRAConfig(r=2, alpha=4, dropout=0.1, target_modules=["c_attn"], modules_to_save=["transformer.ln_f"]))
    _train_mode(model, base_dropout, ["transformer.ln_f"])
    adapted = dora_layers(model)
    inside = {name for layer_name in adapted for name, _ in model.named_modules() if name.startswith(layer_name)}
    base_dropouts = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and name not in inside]
    assert base_dropouts and all(m.training == base_dropout for m in base_dropouts)
    assert all(layer.training for layer in adapted.values())
    assert model.get_submodule("transformer.ln_f").training
