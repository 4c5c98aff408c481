"""SimulateConfig: every knob of one decentralized run, validated before anything loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from d2ora.data.partition import SCHEMES
from d2ora.data.sources import BBC_NEWS
from d2ora.data.tasks import TaskName
from d2ora.dora.config import DoRAConfig
from d2ora.engine.drift import DRIFT_METHODS
from d2ora.engine.share import SHARE_MODES
from d2ora.mixers import MIXERS
from d2ora.mixers.robust import ROBUST_RULES
from d2ora.models import DEFAULT_MODEL, check_device_name
from d2ora.topology import MIXING_RULES, TOPOLOGY_NAMES
from d2ora.trust.attacks import ATTACKS

#: The run mode that is not a mixer: one peer trained on the pooled data (the upper bound).
#: ``mixer: centralized`` (and ``--mixer centralized``, ``compare --mixers ...,centralized``) is
#: accepted as a shorthand for ``mode: centralized``.
CENTRALIZED = "centralized"
MIXER_CHOICES = tuple(sorted(MIXERS))
WIRE_DTYPES = ("native", "fp32", "bf16", "fp16")
#: Keys that cannot change a run's results: they may differ between a run and its resume, and
#: between the processes of one torchrun job.
RESULT_NEUTRAL_KEYS = frozenset({
    "eval_batch_size", "output_dir", "device", "peer_group_size", "timeout_s", "checkpoint_every",
    "keep_checkpoints", "tensorboard", "save_adapters", "save_merged",
    # Where a process finds its keys and roster may differ per machine; the roster's *content* is
    # agreed separately (its SHA-256 is part of the run id).
    "roster", "keys_dir", "key_passphrase_env",
})
TRUST_MODES = ("off", "simulated", "keys")
#: Measured on a 2-core CPU with MiniLM (benchmarks/simulate_scale.py): passes of about 2k tokens
#: are fastest; larger ones are memory-bound in their elementwise work.
CPU_TOKENS_PER_PASS = 2048


_CHOICES: dict[str, tuple[str, ...]] = {
    "mixer": MIXER_CHOICES, "partition": SCHEMES, "topology": TOPOLOGY_NAMES, "mixing": MIXING_RULES,
}


def _key(value: str) -> str:
    return str(value).strip().lower().replace("-", "_")


class SimulateConfig(BaseModel):
    """One ``d2ora simulate`` run; ``d2ora simulate --config run.yaml --set key=value`` reads it."""

    model_config = ConfigDict(extra="forbid")

    # --- data
    model: str | None = Field(None, description="Preset ('minilm', 'smollm2'), local folder, .gguf file or Hub name; null: the task's default.")
    task: TaskName = Field("classification", description="'classification' (accuracy) or 'causal_lm' (perplexity).")
    data: str | dict[str, list[Any]] = Field(BBC_NEWS, description="'bbc_news' (shipped), a local file or folder, a Hub name (online), or inline columns.")
    data_split: str = Field("train", description="Split read from a Hub dataset.")
    text_column: str = Field("text", description="Column holding the input text.")
    label_column: str = Field("label", description="Class label column (classification; also drives label-skewed partitions).")
    max_length: int = Field(128, gt=1, description="Tokens per example; longer texts are truncated.")
    test_fraction: float = Field(0.15, gt=0, lt=1, description="Share held out as the one global test set.")
    max_train_samples: int | None = Field(None, gt=0, description="Cap on the pooled training examples before partitioning (null: all).")
    max_test_samples: int | None = Field(150, gt=0, description="Cap on the global test set (stratified; null: all).")
    seed: int = Field(0, description="Seeds splits, partition, adapter init, batch order.")

    # --- peers and their data
    peers: int = Field(8, ge=1, description="Number of peers.")
    partition: str = Field("dirichlet", description=f"How the pool is dealt to peers: {', '.join(SCHEMES)}.")
    dirichlet_alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (smaller: more label skew).")
    labels_per_peer: int = Field(2, ge=1, description="k for the 'k_labels' partition.")
    min_partition_size: int = Field(10, ge=1, description="Smallest shard the Dirichlet partitioner accepts.")
    local_val_fraction: float = Field(0.1, ge=0, lt=1, description="Share of each peer's shard kept as its local validation split.")

    # --- graph and mixing
    topology: str = Field("ring", description=f"Gossip graph: {', '.join(TOPOLOGY_NAMES)}.")
    topology_params: dict[str, Any] = Field(default_factory=dict, description="Extra builder arguments, e.g. {p: 0.3, seed: 1} for erdos_renyi, {path: edges.txt} for file.")
    mixing: str = Field("metropolis_hastings", description=f"Mixing weights: {', '.join(MIXING_RULES)}.")
    mode: Literal["decentralized", "centralized"] = Field("decentralized", description="'centralized': one peer on the pooled shards with P times the batch (the upper bound; 'mixer: centralized' means the same).")
    mixer: str = Field("decaf", description=f"Aggregation rule: {', '.join(MIXER_CHOICES)}.")
    share: str = Field("all", description="What each peer sends (d2ora.engine.share): all; direction (B, A and head; m stays local); magnitude (m and head); lora_a (A and head, FedSA-LoRA).")
    mixing_steps: int = Field(1, ge=1, description="Gossip steps per round (each sends every adapter to each neighbour once more).")
    wire_dtype: str = Field("native", description=f"Dtype of adapters in messages: {', '.join(WIRE_DTYPES)} ('bf16': half the bytes of fp32; mixing still runs in fp32).")

    # --- adapter
    method: Literal["dora", "lora"] = Field("dora", description="'dora' or plain 'lora' (no magnitude).")
    r: int = Field(8, gt=0, description="Adapter rank.")
    lora_alpha: float = Field(16.0, gt=0, description="Scaling numerator: s = lora_alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input while training (0: runs are short, and masks cost CPU time).")
    base_dropout: bool = Field(False, description="Keep the frozen base model's own dropout on while training (off: the base runs in eval mode).")
    target_modules: list[str] | str = Field(default_factory=lambda: ["all-linear"], description="Layers to adapt.")
    use_rslora: bool = Field(False, description="s = lora_alpha / sqrt(r).")
    modules_to_save: list[str] | None = Field(None, description="Trained in full per peer; null: the new classification head.")

    # --- rounds
    rounds: int = Field(4, ge=1, description="Communication rounds R.")
    local_steps: int = Field(8, ge=1, description="Local AdamW steps T per round.")
    batch_size: int = Field(8, ge=1, description="Examples per peer per local step.")
    lr: float = Field(2e-3, gt=0, description="AdamW peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on matrices.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of steps with linear warm-up; then linear decay to 0.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Per-peer gradient clipping (null: none).")
    drift: str = Field("none", description="Drift correction of the local steps (d2ora.engine.drift): none, qgm (quasi-global momentum, no extra bytes) or kgt (gradient tracking with local steps; doubles the bytes).")
    drift_beta: float = Field(0.9, ge=0, lt=1, description="qgm: the quasi-global momentum's β.")
    prox_mu: float = Field(0.0, ge=0, description="FedProx: weight μ of the proximal term μ/2·||x − x_round_start||² in every local step (0: none).")
    logit_adjust: float = Field(0.0, ge=0, description="Label-prior logit adjustment τ (d2ora.engine.label_prior): each peer trains on softmax(logits + τ·log of its own label frequencies), so the head does not learn its label prior; evaluation uses plain logits (0: none; 1 is the usual value).")
    peer_group_size: int | None = Field(
        None, ge=1,
        description="Peers per forward pass (bounds activation memory); null: all peers on a GPU, and on a CPU as many "
        "as fit in about 2048 tokens (bigger passes spill the CPU caches and run slower, see benchmarks/simulate_scale.py).",
    )
    sequential: bool = Field(False, description="Train one peer per pass (the reference path; slower).")
    dimat_examples: int = Field(4, ge=1, description="Own examples each peer feeds through its model to align neighbours (dimat).")
    dimat_max_tokens: int = Field(512, ge=1, description="Tokens per peer and layer kept for DIMAT's activation matching.")

    # --- evaluation and outputs
    eval_every: int = Field(1, ge=1, description="Evaluate every this many rounds (and always after the last).")
    eval_peers: bool = Field(True, description="Score every peer's own model on the test set (else only the consensus model).")
    eval_batch_size: int = Field(32, ge=1, description="Examples per evaluation batch.")
    output_dir: Path = Field(Path("runs/simulate"), description="Report folder.")
    save_adapters: bool = Field(True, description="Write every peer's final adapter (PEFT format).")
    save_merged: bool = Field(True, description="Write the merged consensus model (dense, loads without d2ora).")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', ... (under torchrun 'auto' takes cuda:LOCAL_RANK).")
    tensorboard: bool = Field(True, description="Write TensorBoard event files to output_dir/tensorboard (tensorboard --logdir runs/).")

    # --- checkpoints and processes
    checkpoint_every: int = Field(1, ge=1, description="Checkpoint every this many rounds (and after the last); --resume continues from the newest.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept per process (older ones are pruned).")
    timeout_s: float = Field(300.0, gt=0, description="d2ora peer: seconds to wait for a neighbour's message before stopping with its name.")

    # --- trust (d2ora.trust): signed messages, per-peer ledgers, robust mixing, attacks
    trust: Literal["off", "simulated", "keys"] = Field("off", description="'simulated': throwaway Ed25519 keys per peer (simulate only); 'keys': real key files (keys_dir) and a roster; either signs and checks every message and keeps a ledger per peer under output_dir/ledger.")
    roster: Path | None = Field(None, description="trust: keys: the roster file (YAML/JSON, peer id -> public key).")
    keys_dir: Path | None = Field(None, description="trust: keys: folder of private keys peer-<k>.key (d2ora keygen); a process reads only its own peers' keys.")
    key_passphrase_env: str | None = Field(None, description="Environment variable holding the key files' passphrase (null: unencrypted keys).")
    max_update_norm: float | None = Field(None, gt=0, description="Reject a message farther than this times the receiver's own adapter norm from it (null: no bound).")
    robust: str = Field("none", description="Byzantine-robust rule over each neighbourhood: none, trimmed_mean, median, krum, multi_krum, centered_clipping, self_centered_clipping.")
    robust_f: int = Field(1, ge=0, description="Byzantine neighbours each robust rule tolerates per neighbourhood.")
    robust_tau: float | None = Field(None, gt=0, description="Clipping radius of the clipping rules (null: adaptive, see d2ora.mixers.robust).")
    attack: str = Field("none", description="What the 'byzantine' peers do (d2ora.trust.attacks): sign_flip, gaussian, alie, ipm, dissensus, label_flip, forged_signature, missing_signature, replay, nan, wrong_shape, equivocation.")
    byzantine: list[int] = Field(default_factory=list, description="Peer ids that attack (e.g. [2, 5]); reports score the honest peers.")
    attack_scale: float | None = Field(None, gt=0, description="The attack's strength ε (null: the attack's default).")

    @model_validator(mode="before")
    @classmethod
    def _centralized_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and _key(data.get("mixer", "")) == CENTRALIZED:
            data = {**data, "mixer": "local", "mode": CENTRALIZED}
        return data

    @field_validator("wire_dtype")
    @classmethod
    def _known_wire_dtype(cls, value: str) -> str:
        key = _key(value).replace("bfloat16", "bf16").replace("float32", "fp32").replace("float16", "fp16")
        if key not in WIRE_DTYPES:
            raise ValueError(f"unknown wire_dtype {value!r}; choose one of {', '.join(WIRE_DTYPES)}")
        return key

    @field_validator("mixer", "partition", "topology", "mixing")
    @classmethod
    def _known_name(cls, value: str, info: ValidationInfo) -> str:
        """Case-insensitive, '-' for '_'; an unknown name lists the valid ones."""
        choices = _CHOICES[info.field_name]
        key = _key(value)
        if key not in choices:
            raise ValueError(f"unknown {info.field_name} {value!r}; choose one of {', '.join(choices)}")
        return key

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        return check_device_name(value)

    @field_validator("trust", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML 1.1 reads a bare ``off`` (``--set trust=off``) as the boolean false."""
        return "off" if value is False else value

    @field_validator("share", "drift", "robust", "attack")
    @classmethod
    def _known_option(cls, value: str, info: ValidationInfo) -> str:
        """Names defined by the modules that implement them; case-insensitive, '-' for '_'."""
        choices = {"share": SHARE_MODES, "drift": DRIFT_METHODS, "robust": ("none", *ROBUST_RULES),
                   "attack": ("none", *ATTACKS)}[info.field_name]
        key = _key(value)
        if key not in choices:
            raise ValueError(f"unknown {info.field_name} {value!r}; choose one of {', '.join(choices)}")
        return key

    @model_validator(mode="after")
    def _consistent(self) -> SimulateConfig:
        if self.peer_group_size is not None and self.peer_group_size > self.peers:
            raise ValueError(f"peer_group_size={self.peer_group_size} exceeds peers={self.peers}")
        self._check_trust()
        self._check_drift()
        self._check_share()
        return self

    def _check_share(self) -> None:
        if self.share == "all":
            return
        if self.centralized or self.mixer == "local":
            raise ValueError(f"share: {self.share} chooses what peers send; mode centralized and mixer local send nothing (set share: all)")
        if self.mixer in ("dora_exact", "fedavg_exact"):
            raise ValueError(f"mixer {self.mixer} mixes the merged weight, m and B·A together: it needs share: all")
        if self.share in ("magnitude", "lora_a") and MIXERS[self.mixer].factors_replaced:
            raise ValueError(f"share: {self.share} keeps B in each peer's own basis, which mixer {self.mixer} re-bases: use d2ora, fedavg or dimat")
        if self.share == "magnitude" and self.method == "lora":
            raise ValueError("share: magnitude shares DoRA's magnitudes, and method lora has none")

    def _check_drift(self) -> None:
        if self.logit_adjust > 0 and self.task != "classification":
            raise ValueError("logit_adjust adjusts class logits by each peer's label prior: it needs task classification")
        if self.logit_adjust > 0 and self.centralized:
            raise ValueError("logit_adjust removes each peer's own label prior; mode centralized has one peer on the pooled data (set logit_adjust: 0)")
        if self.drift == "none":
            return
        if self.centralized or self.mixer == "local":
            raise ValueError(f"drift: {self.drift} corrects peers towards their neighbours; mode centralized and mixer local have none (use prox_mu, or drift: none)")
        if self.drift == "kgt" and self.robust != "none":
            raise ValueError("drift: kgt mixes the peers' updates linearly, outside the robust rule: use it with robust: none")

    def _check_trust(self) -> None:
        if (self.attack == "none") != (not self.byzantine):
            raise ValueError("an attack needs byzantine peers and byzantine peers need an attack: set both 'attack' and 'byzantine'")
        wrong = [p for p in self.byzantine if not 0 <= p < self.peers]
        if wrong or len(set(self.byzantine)) != len(self.byzantine):
            raise ValueError(f"byzantine must list distinct peer ids in 0..{self.peers - 1}, got {self.byzantine}")
        if self.byzantine and len(self.byzantine) >= self.peers:
            raise ValueError("at least one peer must be honest")
        if self.attack not in ("none", "label_flip") and self.trust == "off":
            raise ValueError(f"attack {self.attack!r} acts on signed messages: set trust: simulated (or keys)")
        if self.byzantine and self.centralized:
            raise ValueError("mode centralized has one peer on the pooled data: there are no byzantine peers to choose")
        if self.trust != "off" and self.centralized:
            raise ValueError("mode centralized sends no messages: there is nothing to sign (set trust: off)")
        if self.trust == "keys" and (self.roster is None or self.keys_dir is None):
            raise ValueError("trust: keys needs 'roster' (the roster file) and 'keys_dir' (the folder of peer-<k>.key files)")
        if self.robust != "none" and self.centralized:
            raise ValueError("mode centralized has no neighbourhoods to make robust (set robust: none)")

    @property
    def model_name(self) -> str:
        return self.model or DEFAULT_MODEL[self.task]

    @property
    def centralized(self) -> bool:
        return self.mode == CENTRALIZED

    @property
    def run_name(self) -> str:
        """The method's name in reports: the mixer (with its robust rule, drift correction, FedProx μ
        and logit adjustment τ, e.g. 'decaf+kgt+prox0.01+la1'), or 'centralized'."""
        if self.centralized:
            return CENTRALIZED
        parts = [self.mixer]
        parts += [self.robust] if self.robust != "none" else []
        parts += [self.drift] if self.drift != "none" else []
        parts += [f"prox{self.prox_mu:g}"] if self.prox_mu > 0 else []
        parts += [f"la{self.logit_adjust:g}"] if self.logit_adjust > 0 else []
        return "+".join(parts)

    @property
    def honest_peers(self) -> list[int]:
        return [p for p in range(self.peers) if p not in set(self.byzantine)]

    def result_config(self) -> dict[str, Any]:
        """The keys that decide results (JSON-able): what a resume and every torchrun process must share."""
        data = self.model_dump(mode="json")
        return {k: v for k, v in sorted(data.items()) if k not in RESULT_NEUTRAL_KEYS}

    def group_size(self, device: torch.device) -> int:
        """Peers per pass: the configured size, or the default for ``device`` (see the field)."""
        peers = 1 if self.centralized else self.peers
        if self.peer_group_size is not None:
            return min(self.peer_group_size, peers)
        if device.type != "cpu":
            return peers
        return max(1, min(peers, CPU_TOKENS_PER_PASS // (self.batch_size * self.max_length)))

    @property
    def peer_batch_size(self) -> int:
        """Examples per peer per step: ``centralized``'s one peer takes everybody's batches."""
        return self.batch_size * (self.peers if self.centralized else 1)

    @property
    def total_steps(self) -> int:
        return self.rounds * self.local_steps

    def dora_config(self, modules_to_save: list[str]) -> DoRAConfig:
        return DoRAConfig(
            r=self.r, alpha=self.lora_alpha, dropout=self.dropout, target_modules=self.target_modules,
            modules_to_save=modules_to_save, use_rslora=self.use_rslora, use_dora=self.method == "dora",
            init_seed=self.seed,
        )

    def partition_params(self) -> dict[str, Any]:
        if self.partition == "dirichlet":
            return {"alpha": self.dirichlet_alpha, "min_size": self.min_partition_size}
        if self.partition == "k_labels":
            return {"k": self.labels_per_peer}
        return {}

    def partition_label(self) -> str:
        params = self.partition_params()
        params.pop("min_size", None)
        inner = ", ".join(f"{k}={v}" for k, v in params.items())
        return f"{self.partition}({inner})" if inner else self.partition
