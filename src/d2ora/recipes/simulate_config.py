"""SimulateConfig: one decentralized run in sections, validated before anything loads.

``data`` (with the partition), ``model``, ``adapter`` and ``optim`` are the sections ``d2ora train``
shares (:mod:`d2ora.recipes.sections`); ``network`` holds the peers, their graph, the mixer and the
drift corrections; ``trust`` the signatures, ledgers, robust rules and attacks; ``run`` the rounds,
evaluation, outputs, checkpoints and device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator

from d2ora.data.partition import SCHEMES
from d2ora.dora.config import DoRAConfig
from d2ora.engine.drift import DRIFT_METHODS
from d2ora.engine.outer_optimizer import OUTER_OPTIMIZERS, check_outer_mixer
from d2ora.engine.share import SHARE_MODES
from d2ora.mixers import MIXERS
from d2ora.mixers.robust import ROBUST_RULES
from d2ora.recipes.sections import DataSection, ModelSection, OptimSection, RunSection, Section, SectionedConfig
from d2ora.topology import MIXING_RULES, TOPOLOGY_NAMES
from d2ora.trust.attacks import ATTACKS

#: The run mode that is not a mixer: one peer trained on the pooled data (the upper bound).
#: ``network.mixer: centralized`` (and ``--mixer centralized``, ``compare --mixers ...,centralized``)
#: is accepted as a shorthand for ``network.mode: centralized``.
CENTRALIZED = "centralized"
MIXER_CHOICES = tuple(sorted(MIXERS))
WIRE_DTYPES = ("native", "fp32", "bf16", "fp16")
TRUST_MODES = ("off", "simulated", "keys")
#: Measured on a 2-core CPU with MiniLM (benchmarks/simulate_scale.py): passes of about 2k tokens
#: are fastest; larger ones are memory-bound in their elementwise work.
CPU_TOKENS_PER_PASS = 2048


def _key(value: str) -> str:
    return str(value).strip().lower().replace("-", "_")


def _choice(value: str, choices: tuple[str, ...], what: str) -> str:
    """Case-insensitive, '-' for '_'; an unknown name lists the valid ones."""
    key = _key(value)
    if key not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
    return key


class PeerDataSection(DataSection):
    """The data, and how the pooled training examples are dealt to the peers."""

    partition: str = Field("dirichlet", description=f"How the pool is dealt to peers: {', '.join(SCHEMES)}.")
    dirichlet_alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (smaller: more label skew).")
    labels_per_peer: int = Field(2, ge=1, description="k for the 'k_labels' partition.")
    min_partition_size: int = Field(10, ge=1, description="Smallest shard the Dirichlet partitioner accepts.")
    local_val_fraction: float = Field(0.1, ge=0, lt=1, description="Share of each peer's shard kept as its local validation split.")
    peer_sources: list[str] | None = Field(
        None,
        description="partition by_source: one data source per peer (files, or any data.source value), in peer order; "
        "peer k trains on its own source only. Each source is split by test_fraction (stratified by class when it has "
        "labels); the test set is the union of every source's test part, each peer's validation split its own "
        "local_val_fraction of its training part; max_train_samples / max_test_samples cap the unions, each source "
        "keeping its share. data.source is not read.",
    )

    @field_validator("partition")
    @classmethod
    def _known_partition(cls, value: str) -> str:
        return _choice(value, SCHEMES, "partition")

    @model_validator(mode="after")
    def _sources_need_by_source(self) -> PeerDataSection:
        if self.partition == "by_source" and not self.peer_sources:
            raise ValueError("data.partition by_source needs data.peer_sources: one data source per peer")
        if self.peer_sources and self.partition != "by_source":
            raise ValueError(f"data.peer_sources gives one source per peer: set data.partition: by_source (not {self.partition})")
        return self

    def partition_params(self) -> dict[str, Any]:
        if self.partition == "dirichlet":
            return {"alpha": self.dirichlet_alpha, "min_size": self.min_partition_size}
        if self.partition == "k_labels":
            return {"k": self.labels_per_peer}
        return {}

    def partition_label(self) -> str:
        if self.partition == "by_source" and self.peer_sources:  # says where the held-out data come from
            return (f"by_source({len(self.peer_sources)} sources, one per peer; test: {self.test_fraction:g} of each source, "
                    f"pooled; validation: {self.local_val_fraction:g} of each peer's own)")
        params = self.partition_params()
        params.pop("min_size", None)
        inner = ", ".join(f"{k}={v}" for k, v in params.items())
        return f"{self.partition}({inner})" if inner else self.partition


class NetworkSection(Section):
    """The peers, their gossip graph, the aggregation rule, what travels, and drift corrections."""

    peers: int = Field(8, ge=1, description="Number of peers.")
    topology: str = Field("ring", description=f"Gossip graph: {', '.join(TOPOLOGY_NAMES)}.")
    topology_params: dict[str, Any] = Field(default_factory=dict, description="Extra builder arguments, e.g. {p: 0.3, seed: 1} for erdos_renyi, {path: edges.txt} for file.")
    mixing: str = Field("metropolis_hastings", description=f"Mixing weights: {', '.join(MIXING_RULES)}.")
    mode: Literal["decentralized", "centralized"] = Field("decentralized", description="'centralized': one peer on the pooled shards with P times the batch (the upper bound; 'mixer: centralized' means the same).")
    mixer: str = Field("decaf", description=f"Aggregation rule: {', '.join(MIXER_CHOICES)}.")
    share: str = Field("all", description="What each peer sends (d2ora.engine.share): all; direction (B, A and head; m stays local); magnitude (m and head); lora_a (A and head, FedSA-LoRA).")
    mixing_steps: int = Field(1, ge=1, description="Gossip steps per round (each sends every adapter to each neighbour once more).")
    wire_dtype: str = Field("native", description=f"Dtype of adapters in messages: {', '.join(WIRE_DTYPES)} ('bf16': half the bytes of fp32; mixing still runs in fp32).")
    timeout_s: float = Field(300.0, gt=0, description="d2ora peer: seconds to wait for a neighbour's message before stopping with its name.")
    round_timeout_s: float | None = Field(None, gt=0, description="d2ora peer --roster/--key (gRPC links): seconds each round waits for a neighbour's message; one that misses it is left out of that round's mix (weights renormalised) and recorded absent, and the run goes on (None: timeout_s).")
    drift: str = Field("none", description="Drift correction of the local steps (d2ora.engine.drift): none, qgm (quasi-global momentum, no extra bytes) or kgt (gradient tracking with local steps; doubles the bytes).")
    drift_beta: float = Field(0.9, ge=0, lt=1, description="qgm: the quasi-global momentum's β.")
    prox_mu: float = Field(0.0, ge=0, description="FedProx: weight μ of the proximal term μ/2·||x − x_round_start||² in every local step (0: none).")
    logit_adjust: float = Field(0.0, ge=0, description="Label-prior logit adjustment τ (d2ora.engine.label_prior): each peer trains on softmax(logits + τ·log of its own label frequencies), so the head does not learn its label prior; evaluation uses plain logits (0: none; 1 is the usual value).")
    dimat_examples: int = Field(4, ge=1, description="Own examples each peer feeds through its model to align neighbours (dimat).")
    dimat_max_tokens: int = Field(512, ge=1, description="Tokens per peer and layer kept for DIMAT's activation matching.")
    outer_optimizer: str = Field("none", description=f"Outer optimizer on each peer's gossip average (d2ora.engine.outer_optimizer; DiLoCo / NoLoCo): {', '.join(OUTER_OPTIMIZERS)} (nesterov: x ← x_start − outer_lr·Nesterov(x_start − x_mixed), torch SGD's rule; factor-averaging mixers only).")
    outer_lr: float = Field(0.7, gt=0, allow_inf_nan=False, description="outer_optimizer: the outer learning rate η (1 with outer_momentum 0: the plain mix).")
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="outer_optimizer: the Nesterov momentum μ (0: plain SGD on the pseudo-gradient).")

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
        return _choice(key, WIRE_DTYPES, "wire_dtype")

    @field_validator("mixer", "topology", "mixing", "share", "drift")
    @classmethod
    def _known_name(cls, value: str, info: ValidationInfo) -> str:
        choices = {"mixer": MIXER_CHOICES, "topology": TOPOLOGY_NAMES, "mixing": MIXING_RULES,
                   "share": SHARE_MODES, "drift": DRIFT_METHODS}[info.field_name]
        return _choice(value, choices, info.field_name)

    @field_validator("outer_optimizer")
    @classmethod
    def _known_outer_optimizer(cls, value: str) -> str:
        return _choice(value, OUTER_OPTIMIZERS, "outer_optimizer")

    @property
    def centralized(self) -> bool:
        return self.mode == CENTRALIZED


class TrustSection(Section):
    """d2ora.trust: signed messages, per-peer ledgers, robust mixing, attacks."""

    mode: Literal["off", "simulated", "keys"] = Field("off", description="'simulated': throwaway Ed25519 keys per peer (simulate only); 'keys': real key files (keys_dir) and a roster; either signs and checks every message and keeps a ledger per peer under run.output_dir/ledger.")
    roster: Path | None = Field(None, description="mode keys: the roster file (YAML/JSON, peer id -> public key).")
    keys_dir: Path | None = Field(None, description="mode keys: folder of private keys peer-<k>.key (d2ora keygen); a process reads only its own peers' keys.")
    key_passphrase_env: str | None = Field(None, description="Environment variable holding the key files' passphrase (null: unencrypted keys).")
    max_update_norm: float | None = Field(None, gt=0, description="Reject a message farther than this times the receiver's own adapter norm from it (null: no bound).")
    robust: str = Field("none", description="Byzantine-robust rule over each neighbourhood: none, trimmed_mean, median, krum, multi_krum, centered_clipping, self_centered_clipping.")
    robust_f: int = Field(1, ge=0, description="Byzantine neighbours each robust rule tolerates per neighbourhood.")
    robust_tau: float | None = Field(None, gt=0, description="Clipping radius of the clipping rules (null: adaptive, see d2ora.mixers.robust).")
    attack: str = Field("none", description="What the 'byzantine' peers do (d2ora.trust.attacks): sign_flip, gaussian, alie, ipm, dissensus, label_flip, forged_signature, missing_signature, replay, nan, wrong_shape, equivocation.")
    byzantine: list[int] = Field(default_factory=list, description="Peer ids that attack (e.g. [2, 5]); reports score the honest peers.")
    attack_scale: float | None = Field(None, gt=0, description="The attack's strength ε (null: the attack's default).")

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML 1.1 reads a bare ``off`` (``--set trust.mode=off``) as the boolean false."""
        return "off" if value is False else value

    @field_validator("robust", "attack")
    @classmethod
    def _known_option(cls, value: str, info: ValidationInfo) -> str:
        choices = {"robust": ("none", *ROBUST_RULES), "attack": ("none", *ATTACKS)}[info.field_name]
        return _choice(value, choices, info.field_name)


class SimulateRunSection(RunSection):
    """Rounds, evaluation, outputs, checkpoints and how peers are batched."""

    rounds: int = Field(4, ge=1, description="Communication rounds R.")
    local_steps: int = Field(8, ge=1, description="Local AdamW steps T per round.")
    output_dir: Path = Field(Path("runs/simulate"), description="Report folder.")
    eval_every: int = Field(1, ge=1, description="Evaluate every this many rounds (and always after the last).")
    eval_peers: bool = Field(True, description="Score every peer's own model on the test set (else only the consensus model).")
    generate_examples: int = Field(
        16, ge=0,
        description="sft: test examples per evaluation and model answered by greedy decoding for "
        "generative_accuracy (0: none); about 1.5 s an example for SmolLM2-135M on a 2-core CPU, so it is capped.",
    )
    save_adapters: bool = Field(True, description="Write every peer's final adapter (PEFT format).")
    save_merged: bool = Field(True, description="Write the merged consensus model (dense, loads without d2ora).")
    tensorboard: bool = Field(True, description="Write TensorBoard event files to output_dir/tensorboard (tensorboard --logdir runs/).")
    checkpoint_every: int = Field(1, ge=1, description="Checkpoint every this many rounds (and after the last); --resume continues from the newest.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept per process (older ones are pruned).")
    peer_group_size: int | None = Field(
        None, ge=1,
        description="Peers per forward pass (bounds activation memory); null: all peers on a GPU, and on a CPU as many "
        "as fit in about 2048 tokens (bigger passes spill the CPU caches and run slower, see benchmarks/simulate_scale.py).",
    )
    sequential: bool = Field(False, description="Train one peer per pass (the reference path; slower).")


#: Where each key of the earlier flat SimulateConfig lives now.
SIMULATE_MOVED_KEYS: dict[str, str] = {
    **{k: f"data.{k}" for k in ("text_column", "label_column", "max_length", "test_fraction", "max_train_samples",
                                "max_test_samples", "partition", "dirichlet_alpha", "labels_per_peer",
                                "min_partition_size", "local_val_fraction")},
    "data": "data.source", "data_split": "data.split",
    "model": "model.name", "task": "model.task", "base_dropout": "model.base_dropout",
    "method": "adapter.use_dora", "lora_alpha": "adapter.alpha",
    **{k: f"adapter.{k}" for k in ("r", "dropout", "target_modules", "use_rslora", "modules_to_save")},
    **{k: f"optim.{k}" for k in ("batch_size", "lr", "weight_decay", "warmup_ratio", "max_grad_norm")},
    **{k: f"network.{k}" for k in ("peers", "topology", "topology_params", "mixing", "mode", "mixer", "share",
                                   "mixing_steps", "wire_dtype", "timeout_s", "round_timeout_s", "drift", "drift_beta", "prox_mu",
                                   "logit_adjust", "dimat_examples", "dimat_max_tokens")},
    "trust": "trust.mode",
    **{k: f"trust.{k}" for k in ("roster", "keys_dir", "key_passphrase_env", "max_update_norm", "robust", "robust_f",
                                 "robust_tau", "attack", "byzantine", "attack_scale")},
    **{k: f"run.{k}" for k in ("seed", "rounds", "local_steps", "eval_every", "eval_peers", "eval_batch_size",
                               "output_dir", "save_adapters", "save_merged", "device", "tensorboard",
                               "checkpoint_every", "keep_checkpoints", "peer_group_size", "sequential")},
}


class SimulateConfig(SectionedConfig):
    """One ``d2ora simulate`` run; ``d2ora simulate --config run.yaml --set section.key=value`` reads it."""

    data: PeerDataSection = Field(default_factory=PeerDataSection, description="The data and the partition over peers.")
    model: ModelSection = Field(default_factory=ModelSection, description="The frozen base model.")
    adapter: DoRAConfig = Field(default_factory=DoRAConfig, description="The DoRA adapter every peer trains (modules_to_save null: the task's head; init_seed null: run.seed).")
    optim: OptimSection = Field(default_factory=OptimSection, description="Each peer's AdamW.")
    network: NetworkSection = Field(default_factory=NetworkSection, description="Peers, graph, mixer, what travels, drift corrections.")
    trust: TrustSection = Field(default_factory=TrustSection, description="Signatures, ledgers, robust rules, attacks.")
    run: SimulateRunSection = Field(default_factory=SimulateRunSection, description="Rounds, evaluation, outputs, checkpoints, device.")

    moved_keys: ClassVar[dict[str, str]] = SIMULATE_MOVED_KEYS
    #: Keys that cannot change a run's results: they may differ between a run and its resume, and
    #: between the processes of one torchrun job. Where a process finds its keys and roster may
    #: differ per machine; the roster's *content* is agreed separately (its SHA-256 is in the run id).
    result_neutral_keys: ClassVar[frozenset[str]] = frozenset({
        "run.eval_batch_size", "run.output_dir", "run.device", "run.peer_group_size", "network.timeout_s", "network.round_timeout_s",
        "run.checkpoint_every", "run.keep_checkpoints", "run.tensorboard", "run.save_adapters", "run.save_merged",
        "trust.roster", "trust.keys_dir", "trust.key_passphrase_env",
        # Recomputing activations changes float rounding at most, as peer_group_size does.
        "model.gradient_checkpointing",
    })

    @model_validator(mode="after")
    def _consistent(self) -> SimulateConfig:
        sources = self.data.peer_sources
        if sources is not None and len(sources) != self.network.peers:
            raise ValueError(f"data.peer_sources lists {len(sources)} source(s) but network.peers is {self.network.peers}: give one source per peer")
        if self.run.peer_group_size is not None and self.run.peer_group_size > self.network.peers:
            raise ValueError(f"run.peer_group_size={self.run.peer_group_size} exceeds network.peers={self.network.peers}")
        self._check_trust()
        self._check_drift()
        self._check_share()
        return self

    @model_validator(mode="after")
    def _outer_optimizer_fits(self) -> SimulateConfig:
        """The outer step needs a mix, in coordinates the mix keeps (d2ora.engine.outer_optimizer)."""
        net = self.network
        if net.outer_optimizer == "none":
            return self
        if net.centralized or net.mixer == "local":
            raise ValueError(f"network.outer_optimizer: {net.outer_optimizer} steps along each round's gossip average; "
                             "mode centralized and mixer local do not mix (set outer_optimizer: none)")
        check_outer_mixer(net.mixer, MIXERS[net.mixer].factors_replaced)
        return self

    def _check_share(self) -> None:
        net = self.network
        if net.share == "all":
            return
        if net.centralized or net.mixer == "local":
            raise ValueError(f"network.share: {net.share} chooses what peers send; mode centralized and mixer local send nothing (set share: all)")
        if net.mixer in ("dora_exact", "fedavg_exact"):
            raise ValueError(f"mixer {net.mixer} mixes the merged weight, m and B·A together: it needs network.share: all")
        if net.share in ("magnitude", "lora_a") and MIXERS[net.mixer].factors_replaced:
            raise ValueError(f"network.share: {net.share} keeps B in each peer's own basis, which mixer {net.mixer} re-bases: use d2ora, fedavg or dimat")
        if net.share == "magnitude" and not self.adapter.use_dora:
            raise ValueError("network.share: magnitude shares DoRA's magnitudes, and adapter.use_dora: false (LoRA) has none")

    def _check_drift(self) -> None:
        net = self.network
        if net.logit_adjust > 0 and self.model.task != "classification":
            raise ValueError("network.logit_adjust adjusts class logits by each peer's label prior: it needs model.task classification")
        if net.logit_adjust > 0 and net.centralized:
            raise ValueError("network.logit_adjust removes each peer's own label prior; mode centralized has one peer on the pooled data (set logit_adjust: 0)")
        if net.drift == "none":
            return
        if net.centralized or net.mixer == "local":
            raise ValueError(f"network.drift: {net.drift} corrects peers towards their neighbours; mode centralized and mixer local have none (use prox_mu, or drift: none)")
        if net.drift == "kgt" and self.trust.robust != "none":
            raise ValueError("network.drift: kgt mixes the peers' updates linearly, outside the robust rule: use it with trust.robust: none")

    def _check_trust(self) -> None:
        trust, peers, centralized = self.trust, self.network.peers, self.network.centralized
        if (trust.attack == "none") != (not trust.byzantine):
            raise ValueError("an attack needs byzantine peers and byzantine peers need an attack: set both trust.attack and trust.byzantine")
        wrong = [p for p in trust.byzantine if not 0 <= p < peers]
        if wrong or len(set(trust.byzantine)) != len(trust.byzantine):
            raise ValueError(f"trust.byzantine must list distinct peer ids in 0..{peers - 1}, got {trust.byzantine}")
        if trust.byzantine and len(trust.byzantine) >= peers:
            raise ValueError("at least one peer must be honest")
        if trust.attack not in ("none", "label_flip") and trust.mode == "off":
            raise ValueError(f"attack {trust.attack!r} acts on signed messages: set trust.mode: simulated (or keys)")
        if trust.byzantine and centralized:
            raise ValueError("mode centralized has one peer on the pooled data: there are no byzantine peers to choose")
        if trust.mode != "off" and centralized:
            raise ValueError("mode centralized sends no messages: there is nothing to sign (set trust.mode: off)")
        if trust.mode == "keys" and (trust.roster is None or trust.keys_dir is None):
            raise ValueError("trust.mode: keys needs trust.roster (the roster file) and trust.keys_dir (the folder of peer-<k>.key files)")
        if trust.robust != "none" and centralized:
            raise ValueError("mode centralized has no neighbourhoods to make robust (set trust.robust: none)")

    # ------------------------------------------------------------------ derived values
    @property
    def model_name(self) -> str:
        return self.model.resolved_name

    @property
    def centralized(self) -> bool:
        return self.network.centralized

    @property
    def method(self) -> str:
        """'dora' or 'lora', as reports name the adapter."""
        return "dora" if self.adapter.use_dora else "lora"

    @property
    def run_name(self) -> str:
        """The method's name in reports: the mixer (with its robust rule, drift correction, FedProx μ,
        logit adjustment τ and outer optimizer, e.g. 'd2ora+kgt+prox0.01+la1+outer0.7m0.9'), or 'centralized'."""
        if self.centralized:
            return CENTRALIZED
        net, robust = self.network, self.trust.robust
        parts = [net.mixer]
        parts += [robust] if robust != "none" else []
        parts += [net.drift] if net.drift != "none" else []
        parts += [f"prox{net.prox_mu:g}"] if net.prox_mu > 0 else []
        parts += [f"la{net.logit_adjust:g}"] if net.logit_adjust > 0 else []
        parts += [f"outer{net.outer_lr:g}m{net.outer_momentum:g}"] if net.outer_optimizer != "none" else []
        return "+".join(parts)

    @property
    def honest_peers(self) -> list[int]:
        return [p for p in range(self.network.peers) if p not in set(self.trust.byzantine)]

    def group_size(self, device: torch.device) -> int:
        """Peers per pass: the configured size, or the default for ``device`` (see the field)."""
        peers = 1 if self.centralized else self.network.peers
        if self.run.peer_group_size is not None:
            return min(self.run.peer_group_size, peers)
        if device.type != "cpu":
            return peers
        return max(1, min(peers, CPU_TOKENS_PER_PASS // (self.optim.batch_size * self.data.max_length)))

    @property
    def peer_batch_size(self) -> int:
        """Examples per peer per step: ``centralized``'s one peer takes everybody's batches."""
        return self.optim.batch_size * (self.network.peers if self.centralized else 1)

    @property
    def total_steps(self) -> int:
        return self.run.rounds * self.run.local_steps
