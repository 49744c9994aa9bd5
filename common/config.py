"""The run configuration: one TOML file, parsed once at the edge into typed pydantic models.

Keys are kebab-case in TOML (``train.local-steps``) and snake_case in Python
(``cfg.train.local_steps``). Unknown keys, impossible values and missing files raise a
``ConfigError`` naming the key before any model is loaded.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

Task = Literal["causal-lm", "classification"]
DataFormat = Literal["auto", "instruction", "classification", "text"]
Partition = Literal["iid", "dirichlet", "by-column"]
PositiveInt = Annotated[int, Field(gt=0)]


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class Section(BaseModel):
    """Base of every config section: kebab-case aliases, unknown keys refused, frozen."""

    model_config = ConfigDict(
        extra="forbid", alias_generator=_kebab, populate_by_name=True, frozen=True
    )


class ModelConfig(Section):
    """The base model every site and the coordinator load."""

    name: str = Field(description="alias (smollm2-135m, minilm-l6, tiny-llama), HF folder or .gguf")
    task: Task = "causal-lm"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantize: Literal["none", "4bit"] = "none"
    # Seed for weights that are not in the checkpoint (a new classification head, tiny-llama):
    # identical at every site so that the base fingerprint is identical.
    seed: int = 0


class DataConfig(Section):
    """Where the examples come from and how simulation splits them into sites."""

    path: Path
    eval_path: Path | None = None
    format: DataFormat = "auto"
    text_column: str = "text"
    label_column: str = "label"
    instruction_column: str = "instruction"
    context_column: str = "context"
    response_column: str = "response"
    partition: Partition = "iid"
    alpha: Annotated[float, Field(gt=0)] = 0.5
    by: str | None = None
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
        return self


class FederationConfig(Section):
    sites: PositiveInt = 3
    rounds: PositiveInt = 3
    # Fewest accepted replies with which a round still aggregates; None = all sites.
    min_sites: PositiveInt | None = None
    # Seconds the coordinator waits for the replies of one stage.
    round_timeout: Annotated[float, Field(gt=0)] = 3600.0

    @model_validator(mode="after")
    def _check(self) -> FederationConfig:
        if self.min_sites is not None and self.min_sites > self.sites:
            raise ValueError(
                f"federation.min-sites = {self.min_sites} exceeds federation.sites = {self.sites}"
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


class ModuleConfig(Section):
    """One named LoRA adapter module."""

    rank: PositiveInt = 8
    alpha: PositiveInt = 16
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)


class AggregationConfig(Section):
    rule: Literal["fedavg"] = "fedavg"
    # Server learning rate applied to the aggregated delta (1.0 = FedAvg).
    server_lr: Annotated[float, Field(gt=0)] = 1.0
    # Upper bound on the example count a site may claim as its aggregation weight.
    max_examples: PositiveInt = 1_000_000


class PrivacyConfig(Section):
    # "none" = plain deltas, for debugging and benchmarks; the encrypted modes come next.
    mode: Literal["none"] = "none"
    encoding: Literal["fp32", "fp16", "int8"] = "fp32"
    # Largest delta payload (bytes) the coordinator accepts from one site.
    max_payload_bytes: PositiveInt = 256 * 1024 * 1024


class SimulationConfig(Section):
    cpus_per_site: PositiveInt = 1
    gpus_per_site: Annotated[float, Field(ge=0)] = 0.0


class RunConfig(Section):
    """A whole run: what the coordinator reads and the part of it sites are told."""

    model: ModelConfig
    data: DataConfig
    federation: FederationConfig = FederationConfig()
    train: TrainConfig = TrainConfig()
    modules: dict[str, ModuleConfig] = Field(default_factory=lambda: {"shared": ModuleConfig()})
    aggregation: AggregationConfig = AggregationConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    simulation: SimulationConfig = SimulationConfig()

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if set(self.modules) != {"shared"}:
            raise ValueError(
                f"modules: only [modules.shared] is supported so far, got {sorted(self.modules)}"
            )
        return self


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for item in err.errors():
        key = ".".join(_kebab(str(p)) for p in item["loc"]) or "<top level>"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; keys are kebab-case, e.g. local-steps)"
        elif "input" in item and item["type"] != "missing":
            msg = f"{msg} (got {item['input']!r})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


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


def _resolve_paths(raw: dict[str, Any], base_dir: Path) -> None:
    """Make relative data paths relative to the config file's folder, as a user expects."""
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    for key in ("path", "eval-path"):
        value = data.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            # Relative to the config file's folder; else (e.g. a --set path) to the cwd.
            candidate = base_dir / value
            use_cwd = not candidate.exists() and Path(value).exists()
            data[key] = str(Path(value) if use_cwd else candidate)


def _check_files(cfg: RunConfig) -> None:
    for key, path in (("data.path", cfg.data.path), ("data.eval-path", cfg.data.eval_path)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{key}: file not found: {path}")


def load_config(path: Path | str, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config; every problem is a ``ConfigError``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    for text in overrides or []:
        key_path, value = parse_override(text)
        _apply_override(raw, key_path, value)
    _resolve_paths(raw, path.resolve().parent)
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Validate an already-parsed config mapping (kebab-case keys)."""
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None
    _check_files(cfg)
    return cfg


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain JSON-able data with kebab-case keys (for manifests and messages)."""
    return cfg.model_dump(mode="json", by_alias=True)


class SitePlan(Section):
    """What the coordinator tells every site each round (sent as JSON in the train instruction).

    Site-local matters (data path, device, model location) stay in the site's own config.
    """

    task: Task
    train: TrainConfig
    modules: dict[str, ModuleConfig]
    encoding: Literal["fp32", "fp16", "int8"]
    max_eval_examples: PositiveInt


def site_plan(cfg: RunConfig) -> SitePlan:
    """The part of a run config that the coordinator sends to sites."""
    return SitePlan(
        task=cfg.model.task,
        train=cfg.train,
        modules=cfg.modules,
        encoding=cfg.privacy.encoding,
        max_eval_examples=cfg.data.max_eval_examples,
    )
