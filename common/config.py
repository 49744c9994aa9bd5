"""The run configuration: one TOML file, parsed once at the edge into typed pydantic models.

Keys are kebab-case in TOML (``train.local-steps``) and snake_case in Python
(``cfg.train.local_steps``). Unknown keys, impossible values and missing files raise a
``ConfigError`` naming the key before any model is loaded.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.errors import ConfigError
from common.model_names import looks_like_dataset_name
from common.sampling import cohort_size
from common.scopes import MODULE_NAME, PRIVATE, SHARED, module_group

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

Task = Literal["causal-lm", "classification"]
DataFormat = Literal["auto", "instruction", "classification", "text"]
Partition = Literal["iid", "dirichlet", "by-column", "pathological"]
PositiveInt = Annotated[int, Field(gt=0)]
# Delta encodings on the up-link (``common.encoding``); int8 has one scale per tensor,
# int8-block and int4 one bf16 scale per block of values.
DeltaEncoding = Literal["fp32", "fp16", "int8", "int8-block", "int4"]
# The down-link (``common.downlink``): "full" sends every site the whole global state in every
# instruction; an encoding sends a site the step from the version it confirmed, encoded so, or
# a reference to the version it holds (full state only to a site with neither).
DownlinkEncoding = Literal["full", "fp32", "fp16", "int8", "int8-block", "int4"]
# Those that quantise; secure-sum masks its own fixed-point levels instead.
QUANTISED_ENCODINGS = ("int8", "int8-block", "int4")
PrivacyMode = Literal["sealed", "secure-sum", "none"]
PRIVACY_MODES: tuple[PrivacyMode, ...] = ("sealed", "secure-sum", "none")
_DEPLOYED_MODES: tuple[PrivacyMode, ...] = ("sealed", "secure-sum")
NoisePlacement = Literal["central", "distributed"]
_PLACEMENTS: tuple[NoisePlacement, ...] = ("central", "distributed")


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class Section(BaseModel):
    """Base of every config section: kebab-case aliases, unknown keys refused, frozen."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=_kebab,
        populate_by_name=True,
        frozen=True,
        allow_inf_nan=False,  # lr = inf or alpha = nan is never what a user meant
    )


class ModelConfig(Section):
    """The base model every site and the coordinator load."""

    name: str = Field(
        description="alias (smollm2-135m, minilm-l6, tiny-llama), Hugging Face hub id "
        "(org/name, from the local HF cache), a transformers folder or a .gguf file"
    )
    task: Task = "causal-lm"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantize: Literal["none", "4bit"] = "none"
    # Whether a hub id missing from the local Hugging Face cache may be downloaded (never when
    # HF_HUB_OFFLINE is set). Off by default: a run uses the files already on the machine.
    download: bool = False
    # Seed for weights that are not in the checkpoint (a new classification head, tiny-llama):
    # identical at every site so that the base fingerprint is identical.
    seed: int = 0


class DataConfig(Section):
    """Where the examples come from and how simulation splits them into sites."""

    # The examples a simulation splits among its sites: a .jsonl/.json/.csv/.txt file, a
    # .parquet file, a folder (of data files, or written by datasets' save_to_disk), or a
    # Hugging Face data set name (org/name; from the local cache when offline). A deployed
    # coordinator never reads it (each site reads its own data, named in its site config).
    path: Path | None = None
    # Optional data the coordinator evaluates each global adapter on (same forms).
    eval_path: Path | None = None
    # The split read from a folder or hub data set: data.split for data.path, data.eval-split
    # for data.eval-path (a single file is its own split).
    split: str = "train"
    eval_split: str = "test"
    # Licence of the data (an SPDX or hub licence id, e.g. "cc-by-sa-3.0"), written into the
    # model card of every published version; None = unknown.
    license: str | None = None
    # Classification: label names in id order, the same at every site. By default the sorted
    # distinct labels of data.path (simulation) or data.eval-path (deployment).
    labels: list[str] | None = None
    format: DataFormat = "auto"
    text_column: str = "text"
    label_column: str = "label"
    instruction_column: str = "instruction"
    context_column: str = "context"
    response_column: str = "response"
    partition: Partition = "iid"
    alpha: Annotated[float, Field(gt=0)] = 0.5
    by: str | None = None
    # partition = 'pathological': how many distinct values of data.by (or labels) each site
    # holds; None = the fewest that cover every value, ceil(values / sites): disjoint sites.
    labels_per_site: PositiveInt | None = None
    # Fraction of each site's examples kept back for its local evaluation.
    holdout: Annotated[float, Field(ge=0, lt=1)] = 0.1
    # Cap on each site's training examples (after the held-out split); None = all.
    max_examples_per_site: PositiveInt | None = None
    # Cap on examples used per evaluation (site held-out and global eval file).
    max_eval_examples: PositiveInt = 64
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.partition == "by-column" and not self.by:
            raise ValueError("data.partition = 'by-column' needs data.by = '<column name>'")
        if self.labels is not None and (
            len(self.labels) < 2 or len(set(self.labels)) != len(self.labels)
        ):
            raise ValueError("data.labels must list at least 2 distinct label names")
        return self


class FederationConfig(Section):
    sites: PositiveInt = 3
    rounds: PositiveInt = 3
    # A site whose replies were rejected this many times is ignored for the rest of the run.
    quarantine_after: PositiveInt | None = None
    # Fewest accepted replies with which a round still aggregates; None = every instructed
    # site (all sites, or the whole sampled cohort).
    min_sites: PositiveInt | None = None
    # How many connected sites the coordinator waits for before it starts (and, when it
    # samples, before each round); None = federation.sites. Not min-sites: that counts replies.
    min_available_sites: PositiveInt | None = None
    # Share of the available sites each round trains (evaluates), in (0, 1]. The cohort is
    # max(1, round(fraction * available)) sites, never fewer than min-sites, drawn from
    # sampling-seed, the round and the sorted site ids (common/sampling.py): a resumed run
    # draws the same cohorts. 1.0 = every site, every round. The coordinator draws (and knows)
    # the cohort, so the DP accountant credits no amplification by sampling.
    fraction_train: Annotated[float, Field(gt=0, le=1)] = 1.0
    fraction_evaluate: Annotated[float, Field(gt=0, le=1)] = 1.0
    sampling_seed: int = 0
    # Seconds the coordinator waits for the replies of one stage.
    round_timeout: Annotated[float, Field(gt=0)] = 3600.0
    # Sites evaluate on their held-out data in round 0, every N-th round and the last round
    # (the coordinator's own global evaluation, data.eval-path, still runs every round).
    evaluate_every: PositiveInt = 1
    # Start from published adapter versions (server/init_from.py): "PATH" (a run folder or its
    # registry/, relative to the working directory: every sent module's latest version),
    # "PATH:MODULE" or "PATH:MODULE:VERSION". Version 0 of this run is then that version.
    init_from: str | None = None
    # How a global version reaches the sites (see DownlinkEncoding): a lossy encoding rounds
    # each version's step once, as published (common/downlink.py).
    downlink: DownlinkEncoding = "fp16"

    def site_evaluates(self, server_round: int) -> bool:
        """Whether the sites evaluate after ``server_round``."""
        return server_round % self.evaluate_every == 0 or server_round == self.rounds

    @property
    def samples(self) -> bool:
        """Whether a stage instructs a drawn cohort rather than every connected site."""
        return self.fraction_train < 1.0 or self.fraction_evaluate < 1.0

    @property
    def available_floor(self) -> int:
        """The connected sites the coordinator waits for (``min-available-sites``)."""
        return self.sites if self.min_available_sites is None else self.min_available_sites

    def train_cohort(self, available: int) -> int:
        """Sites a training round instructs when ``available`` are connected."""
        return cohort_size(self.fraction_train, available, self.min_sites)

    @property
    def smallest_train_cohort(self) -> int:
        """The smallest training cohort a round can have (at ``min-available-sites``)."""
        return self.train_cohort(self.available_floor)

    @property
    def expected_train_cohort(self) -> int:
        """The training cohort when every site is connected (DP's fixed denominator)."""
        return self.train_cohort(self.sites)

    @model_validator(mode="after")
    def _check(self) -> FederationConfig:
        if self.min_sites is not None and self.min_sites > self.sites:
            raise ValueError(
                f"federation.min-sites = {self.min_sites} exceeds federation.sites = {self.sites}"
            )
        floor = self.available_floor
        if floor > self.sites:
            raise ValueError(
                f"federation.min-available-sites = {floor} exceeds federation.sites = "
                f"{self.sites} (the coordinator would wait for sites that do not exist)"
            )
        if self.min_sites is not None and self.min_sites > floor:
            raise ValueError(
                f"federation.min-sites = {self.min_sites} (replies a round needs) exceeds "
                f"federation.min-available-sites = {floor} (sites the coordinator waits for): "
                "a round could start with fewer sites than it needs; expected min-sites <= "
                "min-available-sites"
            )
        return self


class TrainConfig(Section):
    local_steps: PositiveInt = 10
    batch_size: PositiveInt = 8
    grad_accum: PositiveInt = 1
    max_length: Annotated[int, Field(ge=8)] = 128
    lr: Annotated[float, Field(gt=0)] = 2e-4
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    seed: int = 0
    # Classification under label skew (client/losses.py): 'plain' = the standard
    # cross-entropy over every label; 'restricted' = softmax over the labels the site holds
    # (FedRS); 'calibrated' = FedLC logit calibration by the site's label counts. A site's
    # labels never leave it. Ignored by causal-lm runs.
    classifier_loss: Literal["plain", "restricted", "calibrated"] = "plain"
    calibration_tau: Annotated[float, Field(ge=0)] = 1.0
    # FedRS: the logits of labels the site lacks are scaled by this in [0, 1]; 0 drops them.
    restricted_alpha: Annotated[float, Field(ge=0, le=1)] = 0.0
    # The local optimizer, fresh each round. 'adamw' (the causal-LM default, as in FedIT);
    # 'sgd' (with momentum) for label skew: its steps are linear in the gradients, so the
    # sites' steps add up to the pooled gradient, where AdamW turns each site's tiny push on a
    # label it lacks into a full-size step. Pair it with aggregation.server-optimizer =
    # 'fedadam' for Adam's per-coordinate step size at the coordinator (Reddi et al. 2021).
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    # FedProx: mu / 2 * ||w - w_global||^2 added to the local loss; 0 = off.
    proximal_mu: Annotated[float, Field(ge=0)] = 0.0
    # SCAFFOLD (client/drift.py): every local step adds c - c_i to the gradient, where c_i is
    # the site's mean gradient of its last round (kept at the site) and c the coordinator's
    # weighted mean of them (sent with the train instruction). Corrects client drift under
    # label skew; secure-sum compatible (c is a sum; c_i's change is clipped to
    # privacy.secure-sum.clip-range per coordinate like the delta); twice the bytes up (the
    # delta and c_i's change). Refused with rule 'exact', robust rules, server-clip and DP.
    scaffold: bool = False
    # The lr over one round's local steps (transformers' get_scheduler, restarted each round
    # with the optimizer): 'constant', or 'linear' / 'cosine' decay to 0 at the last step,
    # after warmup-steps of linear warm-up from 0 (also before 'constant').
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    # Gradient-norm clipping of each optimizer step (torch clip_grad_norm_ over the trainable
    # tensors, after accumulation); 0 = off. Not differential privacy: DP clips the delta.
    max_grad_norm: Annotated[float, Field(ge=0)] = 0.0

    @model_validator(mode="after")
    def _check_warmup(self) -> TrainConfig:
        if self.warmup_steps >= self.local_steps and self.warmup_steps > 0:
            raise ValueError(
                f"train.warmup-steps = {self.warmup_steps} must be below train.local-steps = "
                f"{self.local_steps} (warm-up restarts every round)"
            )
        return self


class ModuleConfig(Section):
    """One named LoRA adapter module (a peft named adapter on the shared base)."""

    rank: PositiveInt = 8
    alpha: PositiveInt = 16
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    # shared: aggregated over all sites; group:<name>: over the sites [groups.<name>] lists;
    # private: trained at every site, never sent (each site keeps its own).
    scope: str = SHARED
    # Per-site rank overrides, site id -> rank: a small site trains a smaller adapter. Mixed
    # ranks of a sent module need aggregation.rule = 'exact' (the others average factors).
    site_ranks: dict[str, PositiveInt] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> ModuleConfig:
        group = module_group(self.scope)
        if self.scope not in (SHARED, PRIVATE) and (group is None or not group):
            raise ValueError(
                f"scope = {self.scope!r}: expected 'shared', 'private' or 'group:<name>'"
            )
        return self

    def for_site(self, site_id: str) -> ModuleConfig:
        """This module as ``site_id`` trains it: its own rank, no override table."""
        return self.model_copy(
            update={"rank": self.site_ranks.get(site_id, self.rank), "site_ranks": {}}
        )


Rule = Literal["fedavg", "ffa", "fedsa", "exact"]


class AggregationConfig(Section):
    # fedavg: factors averaged separately; ffa: A frozen, only B sent (exact, half the bytes);
    # fedsa: A aggregated, B private per site; exact: mean of B·A re-factored (sealed mode).
    rule: Rule = "fedavg"
    server_optimizer: Literal["sgd", "fedavgm", "fedadam"] = "sgd"
    # Server learning rate applied to the aggregated delta (sgd with 1.0 = FedAvg; FedAdam
    # moves each coordinate by about lr per round, so it wants ~1e-2).
    server_lr: Annotated[float, Field(gt=0)] = 1.0
    server_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    server_beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    server_beta2: Annotated[float, Field(ge=0, lt=1)] = 0.99
    server_tau: Annotated[float, Field(gt=0)] = 1e-3
    # Server lr over the run: constant; a cosine decay from server-lr in round 1 to
    # server-lr * server-lr-final in the last round (federation.rounds); or 'wsd': constant,
    # then a linear decay over the last fifth of the rounds to server-lr * server-lr-final.
    server_lr_schedule: Literal["constant", "cosine", "wsd"] = "constant"
    server_lr_final: Annotated[float, Field(gt=0, le=1)] = 0.1
    # Upper bound on the example count a site may claim as its aggregation weight.
    max_examples: PositiveInt = 1_000_000
    # Replies whose delta has a larger L2 norm are rejected (None: no bound).
    max_delta_norm: Annotated[float, Field(gt=0)] | None = None
    # Untrusted sites (sealed/plain modes): clip every delta to this L2 norm at the coordinator,
    # and/or aggregate with a coordinate-wise median or trimmed mean instead of the mean.
    server_clip: Annotated[float, Field(gt=0)] | None = None
    robust: Literal["none", "median", "trimmed-mean"] = "none"
    trim_fraction: Annotated[float, Field(ge=0, lt=0.5)] = 0.1

    @model_validator(mode="after")
    def _check(self) -> AggregationConfig:
        if self.robust != "none" and self.rule == "exact":
            raise ValueError(
                f"aggregation.robust = {self.robust!r} replaces the mean of deltas; it cannot be "
                "combined with rule 'exact' (which averages products)"
            )
        if self.rule == "exact" and (self.server_optimizer != "sgd" or self.server_lr != 1.0):
            raise ValueError(
                "aggregation.rule = 'exact' re-factors the adapter every round, so a momentum "
                "or adaptive server optimizer has no consistent basis to act on; use "
                "server-optimizer = 'sgd' with server-lr = 1.0"
            )
        return self


class DpConfig(Section):
    """Site-level differential privacy: clip every site's delta, add Gaussian noise."""

    enabled: bool = False
    clip: Annotated[float, Field(gt=0)] = 1.0  # C: L2 bound on one site's delta per round
    noise_multiplier: Annotated[float, Field(gt=0)] = 1.0  # sigma: noise std on the sum = sigma*C
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    epsilon_budget: Annotated[float, Field(gt=0)] | None = None  # stop before exceeding it
    placement: Literal["central", "distributed"] = "central"
    # Tests only: a fixed seed for the coordinator's noise (default: from the OS's CSPRNG).
    seed: int | None = None


class SecureSumConfig(Section):
    """Fixed-point range of secure-sum mode; the error bound follows from these."""

    # Every coordinate of a delta is clipped to [-clip-range, clip-range] before masking.
    clip_range: Annotated[float, Field(gt=0)] = 1.0
    # Largest example weight a site folds into its masked input (larger counts are capped).
    max_weight: PositiveInt = 10_000
    degree: PositiveInt | None = None  # neighbours per site (SecAgg+); None = all other sites
    threshold: PositiveInt | None = None  # Shamir threshold; None = (degree + 1) // 2 + 1


class PrivacyConfig(Section):
    # sealed: HPKE envelopes signed by each site (default); secure-sum: masked sums only;
    # none: plain deltas, for debugging and benchmarks (marked as such in every manifest).
    mode: PrivacyMode = "sealed"
    kem: Literal["x25519", "mlkem768-x25519"] = "x25519"
    # sealed and none modes only: secure-sum sends fixed-point levels (privacy.secure-sum).
    encoding: DeltaEncoding = "fp32"
    # Error feedback for int8/int4 (common.error_feedback): each site keeps what rounding
    # dropped and adds it to its next delta. Unset: on for a quantised encoding without DP.
    error_feedback: bool | None = None
    # Largest delta payload (bytes) the coordinator accepts from one site.
    max_payload_bytes: PositiveInt = 256 * 1024 * 1024
    # Key files; in simulation, missing ones are created under <out>/keys.
    coordinator_key: Path | None = None
    allow_list: Path | None = None
    dp: DpConfig = DpConfig()
    secure_sum: SecureSumConfig = SecureSumConfig()

    @property
    def feeds_back_errors(self) -> bool:
        """Whether sites use error feedback (``error-feedback``, or its default)."""
        if self.error_feedback is not None:
            return self.error_feedback
        return self.encoding in QUANTISED_ENCODINGS and not self.dp.enabled

    @model_validator(mode="after")
    def _check(self) -> PrivacyConfig:
        if self.dp.enabled and self.dp.placement == "distributed" and self.mode != "secure-sum":
            raise ValueError(
                "privacy.dp.placement = 'distributed' needs privacy.mode = 'secure-sum' "
                "(in sealed mode the coordinator would see each delta with a fraction of the "
                "noise); use placement = 'central'"
            )
        if self.error_feedback and self.encoding not in QUANTISED_ENCODINGS:
            raise ValueError(
                f"privacy.error-feedback = true needs a quantised privacy.encoding "
                f"({', '.join(QUANTISED_ENCODINGS)}); {self.encoding!r} drops nothing to feed back"
            )
        if self.error_feedback and self.dp.enabled:
            raise ValueError(
                "privacy.error-feedback = true cannot be used with privacy.dp: the residual "
                "added after clipping would lift the delta's norm above privacy.dp.clip"
            )
        if self.mode == "secure-sum" and self.encoding in QUANTISED_ENCODINGS:
            raise ValueError(
                f"privacy.encoding = {self.encoding!r} applies to privacy.mode 'sealed' and "
                "'none' only: secure-sum masks its own fixed-point levels, whose precision "
                "privacy.secure-sum.clip-range sets; use encoding 'fp32' or 'fp16' (ignored "
                "there) or privacy.mode = 'sealed'"
            )
        return self


class SitePolicy(Section):
    """The least protection a site accepts: a plan below it is refused, naming the key.

    A deployed site states it in ``site.toml``'s ``[policy]``; in simulation ``[site-policy]``
    stands for what every virtual site's own file would say. Unset bounds do not bind.
    """

    # Privacy modes the site takes part in; a deployed site never sends plain deltas unless
    # its own policy lists "none".
    privacy_modes: list[PrivacyMode] = Field(default_factory=lambda: list(_DEPLOYED_MODES))
    # Refuse plans without DP, or with a smaller noise multiplier (sigma).
    min_noise_multiplier: Annotated[float, Field(gt=0)] | None = None
    # Where the noise may be added: "distributed" means the site adds its share itself.
    dp_placements: list[NoisePlacement] = Field(default_factory=lambda: list(_PLACEMENTS))
    # The site's own accountant: refuse a round after which epsilon (at the site's delta below,
    # whatever the plan says) would exceed this. Needs DP in the plan.
    max_epsilon: Annotated[float, Field(gt=0)] | None = None
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    rules: list[str] | None = None  # aggregation rules accepted (None: any)
    modules: list[str] | None = None  # module names the site trains (None: any)
    max_rounds: PositiveInt | None = None  # refuse instructions for later rounds


def simulation_policy() -> SitePolicy:
    """A virtual site's policy unless the run says otherwise: every mode, no bound."""
    return SitePolicy(privacy_modes=list(PRIVACY_MODES))


class SimulationConfig(Section):
    """How ``fedlora simulate`` hosts the virtual sites on this machine."""

    # "ray": Flower's simulation runtime, each site in a Ray worker (in parallel, timeouts
    # applied); "in-process": the same apps in this process, one site after another, with no
    # Ray (``fedlora/in_process.py``): about 20 s less per run, for debugging and small runs.
    backend: Literal["ray", "in-process"] = "ray"
    cpus_per_site: PositiveInt = 1
    gpus_per_site: Annotated[float, Field(ge=0)] = 0.0


# An MLflow tracking URI names its store by scheme (http://, sqlite:///, postgresql://, ...);
# "host:5000" without one would be read as a scheme named "host".
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://|databricks\b")


class TrackingConfig(Section):
    """Where the coordinator mirrors a run (``server.tracking``); off by default.

    ``metrics.jsonl`` and the registry stay the record: a tracker only copies them, and one
    that cannot be reached never stops a run. Not part of the config digest, so a run may be
    resumed with another tracking server.
    """

    # "mlflow" needs the optional extra (pip install 'fedlora[mlflow]').
    backend: Literal["none", "mlflow"] = "none"
    # None: a local store in <run-dir>/mlflow (an SQLite file and an artifact folder), which
    # needs no server; else a tracking server (http://host:5000) or a database URI.
    mlflow_uri: str | None = None
    experiment: Annotated[str, Field(min_length=1, max_length=250)] = "fedlora"

    @model_validator(mode="after")
    def _check(self) -> TrackingConfig:
        if self.mlflow_uri is not None and self.backend != "mlflow":
            raise ValueError(
                f"tracking.mlflow-uri = {self.mlflow_uri!r} is set but tracking.backend = "
                f"{self.backend!r}; set tracking.backend = 'mlflow' or drop the URI"
            )
        uri = self.mlflow_uri
        if uri is not None and (not _URI_SCHEME.match(uri) or uri.startswith("file:")):
            raise ValueError(
                f"tracking.mlflow-uri = {uri!r}: expected a tracking server "
                "(http://host:5000) or a database URI (sqlite:///path/mlflow.db); MLflow 3 "
                "refuses file: stores, and leaving the key out keeps a local store in the run "
                "folder"
            )
        return self


class RunConfig(Section):
    """A whole run: what the coordinator reads and the part of it sites are told."""

    model: ModelConfig
    data: DataConfig
    federation: FederationConfig = FederationConfig()
    train: TrainConfig = TrainConfig()
    modules: dict[str, ModuleConfig] = Field(default_factory=lambda: {"shared": ModuleConfig()})
    # Site groups for group-scoped modules: group name -> the site ids in it (simulation's
    # sites are site-0 ... site-<N-1>). The coordinator accepts a group module's delta only
    # from the sites listed here.
    groups: dict[str, list[str]] = Field(default_factory=dict)
    aggregation: AggregationConfig = AggregationConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    simulation: SimulationConfig = SimulationConfig()
    tracking: TrackingConfig = TrackingConfig()
    # Simulation only: the policy every virtual site applies to the plans it receives.
    site_policy: SitePolicy = Field(default_factory=simulation_policy)

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.privacy.mode == "secure-sum" and self.aggregation.rule == "exact":
            raise ValueError(
                "aggregation.rule = 'exact' needs each site's delta, which secure-sum hides by "
                "design; use privacy.mode = 'sealed' or a sum-only rule (fedavg, ffa, fedsa)"
            )
        robust = self.aggregation.robust != "none" or self.aggregation.server_clip is not None
        if robust and (self.privacy.mode == "secure-sum" or self.privacy.dp.enabled):
            raise ValueError(
                "aggregation.robust / aggregation.server-clip need each site's delta: use "
                "privacy.mode = 'sealed' without privacy.dp (DP already clips every delta)"
            )
        if self.privacy.dp.enabled and self.aggregation.rule == "exact":
            raise ValueError(
                "privacy.dp with aggregation.rule = 'exact' is not supported: DP clips and "
                "noises deltas, exact re-factors full adapters; use fedavg, ffa or fedsa"
            )
        if self.train.scaffold:
            _check_scaffold(self)
        if self.privacy.mode == "secure-sum" and self.federation.sites < 3:
            raise ValueError(
                "privacy.mode = 'secure-sum' needs federation.sites >= 3 (a sum of two inputs "
                "reveals each to the other site)"
            )
        smallest = self.federation.smallest_train_cohort
        if self.privacy.mode == "secure-sum" and smallest < 3:
            raise ValueError(
                f"privacy.mode = 'secure-sum' needs a training cohort of >= 3 sites, but "
                f"federation.fraction-train = {self.federation.fraction_train:g} of "
                f"federation.min-available-sites = {self.federation.available_floor} sites "
                f"samples {smallest} (a sum of two inputs reveals each to the other site); "
                "raise fraction-train, min-available-sites or min-sites"
            )
        _check_modules(self)
        return self


def _check_scaffold(cfg: RunConfig) -> None:
    """train.scaffold needs a weighted-mean rule over every site's whole delta, unnoised."""
    agg = cfg.aggregation
    refused = [
        (agg.rule == "exact", "aggregation.rule = 'exact' (it re-factors, not a mean)"),
        (agg.robust != "none", f"aggregation.robust = {agg.robust!r}"),
        (agg.server_clip is not None, "aggregation.server-clip"),
        (cfg.privacy.dp.enabled, "privacy.dp (the control variates would leak unclipped "
         "gradients)"),
    ]  # fmt: skip
    reasons = [why for bad, why in refused if bad]
    if reasons:
        raise ValueError(
            "train.scaffold needs the weighted mean of every site's delta and control "
            f"variate; it cannot run with {'; '.join(reasons)}"
        )


# A site id names key files and folders and travels in every envelope: a leading letter or
# digit (no hidden files, no "..") and no path separators; 64 bytes is plenty for a name.
SITE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_names(modules: Mapping[str, ModuleConfig], groups: Mapping[str, list[str]]) -> None:
    """Module, group and site names, which become folder and file names at both ends.

    Checked in the coordinator's config and again by every site in the plan it receives: a
    name such as ``/etc`` or ``../x`` would otherwise make a site write outside its store.
    """
    for name in modules:
        if not MODULE_NAME.fullmatch(name):
            raise ValueError(
                f"modules.{name[:80]}: a module name is lowercase letters, digits, '-' or '_', "
                "starting with a letter, at most 40 characters"
            )
    for group, members in groups.items():
        if not MODULE_NAME.fullmatch(group):
            raise ValueError(f"groups.{group[:80]}: a group name is written like a module name")
        for site in members:
            if not SITE_ID_PATTERN.fullmatch(site):
                raise ValueError(
                    f"groups.{group}: site id {site[:80]!r} is not letters, digits, '.', '_' "
                    "or '-' (at most 64, starting with a letter or digit)"
                )


def _check_modules(cfg: RunConfig) -> None:
    """Module names, scopes and groups, and what each privacy mode and rule supports."""
    check_names(cfg.modules, cfg.groups)
    for name, module in cfg.modules.items():
        group = module_group(module.scope)
        if group is not None and not cfg.groups.get(group):
            raise ValueError(
                f"modules.{name}.scope = {module.scope!r}: no [groups] entry {group!r} listing "
                f'its sites (e.g. groups.{group} = ["site-0", "site-1"])'
            )
        mixed = any(rank != module.rank for rank in module.site_ranks.values())
        if mixed and module.scope != PRIVATE and cfg.aggregation.rule != "exact":
            raise ValueError(
                f"modules.{name}.site-ranks: sites with other ranks than {module.rank} need "
                f"aggregation.rule = 'exact' ({cfg.aggregation.rule!r} averages factors of "
                "one shape)"
            )
    sent = [name for name, module in cfg.modules.items() if module.scope != PRIVATE]
    if not sent:
        raise ValueError("modules: every module is private; a federation needs one to share")
    if len(cfg.modules) > 1 and cfg.model.task == "classification":
        raise ValueError(
            f"modules: {sorted(cfg.modules)}: a classification run has one module (peft keeps "
            "one trainable copy of the classification head per active adapter, and allows "
            "only one active); several modules need model.task = 'causal-lm'"
        )
    single = cfg.privacy.mode == "secure-sum" or cfg.privacy.dp.enabled
    if single and (len(sent) > 1 or cfg.modules[sent[0]].scope != SHARED):
        raise ValueError(
            f"privacy.mode = 'secure-sum' and privacy.dp support one sent module of scope "
            f"'shared' (plus private ones); got {sent}"
        )


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for item in err.errors():
        key = ".".join(_kebab(str(p)) for p in item["loc"]) or "<top level>"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; keys are kebab-case, e.g. local-steps)"
        elif "input" in item and item["type"] != "missing" and item["loc"]:
            # (a check across sections names its keys itself; echoing the input would print
            # the whole config)
            msg = f"{msg} (got {item['input']!r})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


SectionModel = TypeVar("SectionModel", bound=Section)


def validate_config(model: type[SectionModel], raw: dict[str, Any], source: str) -> SectionModel:
    """Validate a parsed TOML mapping into ``model``; one ``ConfigError`` naming every key."""
    _refuse_embedded_secrets(raw)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file as a mapping; a missing or malformed file is a ``ConfigError``."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one ``section.key=value`` override; the value is read as TOML, else as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = [p.strip() for p in key.strip().split(".") if p.strip()]
    if len(path) < 2:
        raise ConfigError(f"--set {text!r}: the key must name a section, e.g. train.lr=1e-4")
    try:
        value: Any = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def _apply_override(raw: dict[str, Any], path: list[str], value: Any) -> None:
    node = raw
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


_PATH_KEYS: dict[str, tuple[str, ...]] = {
    "data": ("path", "eval-path"),
    "privacy": ("coordinator-key", "allow-list"),
}


def resolve_paths(
    raw: dict[str, Any], base_dir: Path, path_keys: dict[str, tuple[str, ...]] = _PATH_KEYS
) -> None:
    """Make relative file paths relative to the config file's folder, as a user expects."""
    for section, keys in path_keys.items():
        table = raw.get(section)
        if not isinstance(table, dict):
            continue
        for key in keys:
            value = table.get(key)
            if isinstance(value, str) and value and not Path(value).is_absolute():
                # Relative to the config file's folder; else (e.g. a --set path) to the cwd.
                candidate = base_dir / value
                in_cwd = _exists(Path(value), f"{section}.{key}")
                if not _exists(candidate, f"{section}.{key}") and (
                    in_cwd or (section == "data" and looks_like_dataset_name(value))
                ):
                    table[key] = value  # a file in the cwd, or a hub data set name as given
                else:
                    table[key] = str(candidate)


def _exists(path: Path, key: str) -> bool:
    try:
        return path.exists()
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise ConfigError(f"{key}: unusable path ({exc.strerror})") from None


_KEY_MATERIAL = "-----BEGIN"


def _refuse_embedded_secrets(raw: Any, where: str = "") -> None:
    """Key material in a config would end up in logs, manifests and backups: refuse it,
    without echoing it."""
    if isinstance(raw, dict):
        for key, value in raw.items():
            _refuse_embedded_secrets(value, f"{where}.{key}" if where else str(key))
    elif isinstance(raw, list):
        for item in raw:
            _refuse_embedded_secrets(item, where)
    elif isinstance(raw, str) and _KEY_MATERIAL in raw:
        raise ConfigError(
            f"{where}: looks like key material; keys belong in a file (mode 0600): give its path"
        )


def _check_files(cfg: RunConfig) -> None:
    files = (
        ("data.path", cfg.data.path),
        ("data.eval-path", cfg.data.eval_path),
        ("privacy.coordinator-key", cfg.privacy.coordinator_key),
        ("privacy.allow-list", cfg.privacy.allow_list),
    )
    for key, path in files:
        if path is not None and not _exists(path, key):
            if key.startswith("data.") and looks_like_dataset_name(str(path)):
                continue  # a hub data set name: common.tables looks it up in the cache
            raise ConfigError(f"{key}: file not found: {path}")


def load_config(path: Path | str, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config; every problem is a ``ConfigError``."""
    path = Path(path)
    raw = read_toml(path)
    for text in overrides or []:
        key_path, value = parse_override(text)
        _apply_override(raw, key_path, value)
    resolve_paths(raw, path.resolve().parent)
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Validate an already-parsed config mapping (kebab-case keys)."""
    cfg = validate_config(RunConfig, raw, source)
    _check_files(cfg)
    return cfg


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain JSON-able data with kebab-case keys (for manifests and messages)."""
    return cfg.model_dump(mode="json", by_alias=True)


class PlanDp(Section):
    """The DP settings a plan declares (never the coordinator's noise seed)."""

    noise_multiplier: float
    placement: NoisePlacement
    epsilon_budget: float | None = None


class SitePlan(Section):
    """What the coordinator tells every site each round (sent as JSON in the train instruction).

    Site-local matters (data path, device, model location) stay in the site's own config.
    """

    task: Task
    train: TrainConfig
    modules: dict[str, ModuleConfig]
    rule: Rule
    encoding: DeltaEncoding
    # Keep the quantisation residual and send it with the next delta (common.error_feedback).
    error_feedback: bool = False
    privacy_mode: PrivacyMode
    # Sites clip their delta to this L2 norm before sending (DP); None = no clipping.
    clip: float | None = None
    # The run's DP settings, for the site's policy and its own accountant; None = no DP.
    dp: PlanDp | None = None
    # Distributed DP (secure-sum): std of the Gaussian noise each site adds to its delta.
    site_noise_std: float = 0.0
    max_eval_examples: PositiveInt
    # Classification: the run's label names in id order; a site maps its labels to these ids.
    labels: list[str] | None = None
    # Group name -> site ids: which group-scoped modules each site trains and sends.
    groups: dict[str, list[str]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> SitePlan:
        check_names(self.modules, self.groups)
        return self


def fewest_survivors(cfg: RunConfig) -> int:
    """The fewest sites whose secure sum can be unmasked, whatever the coordinator does.

    Unmasking needs ``t`` shares (the Shamir threshold) of every survivor's self-mask seed, and
    only survivors reveal those, so no round, not even one driven by a lying coordinator, ends
    with fewer than ``t`` (at least 2) survivors. ``federation.min-sites`` only binds an honest
    coordinator, so it never raises this floor.
    """
    from common.secagg import params_for  # Shamir and HKDF: only where secure sum is used

    ss = cfg.privacy.secure_sum
    # The Shamir threshold grows with the cohort: the smallest cohort a round may sample
    # (federation.fraction-train of min-available-sites) has the lowest floor.
    cohort = cfg.federation.smallest_train_cohort
    params = params_for(cohort, 1.0, 1.0, degree=ss.degree, threshold=ss.threshold)
    return max(2, params.threshold)


def _site_noise_std(cfg: RunConfig) -> float:
    dp = cfg.privacy.dp
    if not dp.enabled or dp.placement != "distributed":
        return 0.0
    from common.dp import site_noise_std  # dp_accounting: ~2 s to import

    # Sized for the fewest survivors that can complete a round, so that their sum alone
    # carries the noise the accountant counts (sigma * C).
    return site_noise_std(dp.noise_multiplier, dp.clip, dp.placement, fewest_survivors(cfg))


def _plan_dp(cfg: RunConfig) -> PlanDp | None:
    dp = cfg.privacy.dp
    if not dp.enabled:
        return None
    return PlanDp(
        noise_multiplier=dp.noise_multiplier,
        placement=dp.placement,
        epsilon_budget=dp.epsilon_budget,
    )


def site_plan(cfg: RunConfig, labels: list[str] | None = None) -> SitePlan:
    """The part of a run config that the coordinator sends to sites (with the run's labels)."""
    return SitePlan(
        task=cfg.model.task,
        train=cfg.train,
        modules=cfg.modules,
        rule=cfg.aggregation.rule,
        encoding=cfg.privacy.encoding,
        error_feedback=cfg.privacy.feeds_back_errors,
        privacy_mode=cfg.privacy.mode,
        clip=cfg.privacy.dp.clip if cfg.privacy.dp.enabled else None,
        dp=_plan_dp(cfg),
        site_noise_std=_site_noise_std(cfg),
        max_eval_examples=cfg.data.max_eval_examples,
        labels=labels,
        groups=cfg.groups,
    )
