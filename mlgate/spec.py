"""Study specs: the YAML files in ``studies/``, validated by Pydantic.

A spec fixes everything a trial needs (method, backbone, data, training, logging) and a ``search``
block of Optuna distributions keyed by dotted paths into the spec. A trial's config is the spec with
the sampled values written at those paths, validated again.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

import yaml
from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator

from mlgate.errors import SpecError
from mlgate.methods import config_classes, method_class
from mlgate.methods.base import StrictModel
from mlgate.pruning import backbone_layers, training_images, trial_problem

STUDIES_DIR = Path(__file__).resolve().parent.parent / "studies"

# --------------------------------------------------------------------------------------------------
# Search space: Optuna's own abbreviated distribution keys (type/low/high/step/log/choices).


class FloatDistribution(StrictModel):
    type: Literal["float"]
    low: float
    high: float
    step: float | None = None
    log: bool = False

    @model_validator(mode="after")
    def _optuna_rules(self) -> FloatDistribution:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot both be set (Optuna: log xor step)")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scale float needs low > 0 (got {self.low})")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"step must be > 0 (got {self.step})")
        return self


class IntDistribution(StrictModel):
    type: Literal["int"]
    low: int
    high: int
    step: int = 1
    log: bool = False

    @model_validator(mode="after")
    def _optuna_rules(self) -> IntDistribution:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        if self.step <= 0:
            raise ValueError(f"step must be > 0 (got {self.step})")
        if self.log and (self.step != 1 or self.low < 1):
            raise ValueError("a log-scale int needs low >= 1 and step 1 (Optuna: log xor step)")
        return self


class CategoricalDistribution(StrictModel):
    type: Literal["categorical"]
    choices: list[None | bool | int | float | str] = Field(min_length=1)


Distribution = Annotated[
    Union[FloatDistribution, IntDistribution, CategoricalDistribution], Field(discriminator="type")
]

# --------------------------------------------------------------------------------------------------
# Samplers and pruners: one class per Optuna kind. The spec's unions and the factory
# (mlgate.sweep.search) both read SAMPLERS and PRUNERS, so adding a kind is one class here.


class OptunaKind(StrictModel):
    """A sampler or pruner setting: ``optuna_class`` names the Optuna class, built with ``optuna_kwargs``."""

    optuna_class: ClassVar[str]

    def optuna_kwargs(self, spec: StudySpec) -> dict[str, Any]:
        return self.model_dump(exclude={"type"})


class TPESamplerSpec(OptunaKind):
    optuna_class: ClassVar[str] = "TPESampler"
    type: Literal["tpe"] = "tpe"
    seed: int | None = 0
    n_startup_trials: int = Field(10, ge=0)
    multivariate: bool = True


class RandomSamplerSpec(OptunaKind):
    optuna_class: ClassVar[str] = "RandomSampler"
    type: Literal["random"]
    seed: int | None = 0


class QMCSamplerSpec(OptunaKind):
    optuna_class: ClassVar[str] = "QMCSampler"
    type: Literal["qmc"]
    seed: int | None = 0


class GPSamplerSpec(OptunaKind):
    optuna_class: ClassVar[str] = "GPSampler"
    type: Literal["gp"]
    seed: int | None = 0
    n_startup_trials: int = Field(10, ge=0)


class GridSamplerSpec(OptunaKind):
    """Every combination of the search values once: categorical choices, and ints stepped low..high."""

    optuna_class: ClassVar[str] = "GridSampler"
    type: Literal["grid"]
    seed: int | None = 0

    def optuna_kwargs(self, spec: StudySpec) -> dict[str, Any]:
        return {"search_space": spec.grid(), "seed": self.seed}


SAMPLERS = (TPESamplerSpec, RandomSamplerSpec, QMCSamplerSpec, GPSamplerSpec, GridSamplerSpec)
SamplerSpec = Annotated[Union[SAMPLERS], Field(discriminator="type")]  # type: ignore[valid-type]


class NoPrunerSpec(OptunaKind):
    optuna_class: ClassVar[str] = "NopPruner"
    type: Literal["none"]


class MedianPrunerSpec(OptunaKind):
    optuna_class: ClassVar[str] = "MedianPruner"
    type: Literal["median"] = "median"
    n_startup_trials: int = Field(5, ge=0)
    n_warmup_steps: int = Field(0, ge=0)
    interval_steps: int = Field(1, ge=1)


class PercentilePrunerSpec(OptunaKind):
    optuna_class: ClassVar[str] = "PercentilePruner"
    type: Literal["percentile"]
    percentile: float = Field(25.0, gt=0.0, lt=100.0)
    n_startup_trials: int = Field(5, ge=0)
    n_warmup_steps: int = Field(0, ge=0)
    interval_steps: int = Field(1, ge=1)


class HyperbandPrunerSpec(OptunaKind):
    optuna_class: ClassVar[str] = "HyperbandPruner"
    type: Literal["hyperband"]
    min_resource: int = Field(1, ge=1)
    reduction_factor: int = Field(3, ge=2)

    def optuna_kwargs(self, spec: StudySpec) -> dict[str, Any]:
        return {**super().optuna_kwargs(spec), "max_resource": spec.train.steps or "auto"}


class ThresholdPrunerSpec(OptunaKind):
    """Prune a trial whose objective leaves [lower, upper] after the warmup."""

    optuna_class: ClassVar[str] = "ThresholdPruner"
    type: Literal["threshold"]
    lower: float | None = None
    upper: float | None = None
    n_warmup_steps: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> ThresholdPrunerSpec:
        if self.lower is None and self.upper is None:
            raise ValueError("set lower, upper or both")
        return self


PRUNERS = (NoPrunerSpec, MedianPrunerSpec, PercentilePrunerSpec, HyperbandPrunerSpec, ThresholdPrunerSpec)
PrunerSpec = Annotated[Union[PRUNERS], Field(discriminator="type")]  # type: ignore[valid-type]

# --------------------------------------------------------------------------------------------------
# Sections.


class CollapsePruningSpec(StrictModel):
    """Early warning: prune a trial whose gates already look collapsed (docs/verdicts.md) after a warm-up."""

    enabled: bool = False
    warmup_steps: int = Field(20, ge=1, description="Judge only at evaluations from this step on.")


class StudySection(StrictModel):
    name: str | None = Field(None, description="Optuna study name and MLflow study run name (default: file stem).")
    n_trials: int = Field(10, ge=1, description="Finished trials (COMPLETE or PRUNED) the study runs to.")
    direction: Literal["maximize", "minimize"] = "maximize"
    objective: str = Field("acc/val", description="Metric reported to Optuna at each evaluation.")
    sampler: SamplerSpec = Field(default_factory=TPESamplerSpec)
    pruner: PrunerSpec = Field(default_factory=MedianPrunerSpec)
    max_consecutive_failures: int = Field(
        3, ge=1, description="Stop the study (exit 1) after this many failed trials in a row."
    )
    collapse_pruning: CollapsePruningSpec = Field(default_factory=lambda: CollapsePruningSpec())
    heartbeat_interval: float = Field(10.0, gt=0.0, description="Seconds between a running trial's heartbeats.")
    heartbeat_grace: float = Field(
        120.0, gt=0.0, description="A running trial without a heartbeat for this long has lost its worker: it is "
        "failed and retried.")
    max_retries: int = Field(3, ge=0, description="Retries of a trial whose worker died.")


class BackboneSpec(StrictModel):
    name: str = Field("mlgate-tiny", description="open_clip model name (e.g. ViT-B-16-quickgelu).")
    pretrained: str | None = Field(
        "mlgate", description="open_clip pretrained tag (openai), local checkpoint path, 'mlgate' (the "
        "weights shipped for mlgate-tiny), or null for random init."
    )


class DataSpec(StrictModel):
    name: str = Field("shapes", description="Dataset name (bundled: 'shapes'; also 'digits').")
    root: str | None = Field(None, description="Folder that holds the dataset's own folder.")
    source: Literal["coop", "torchvision"] = Field(
        "coop", description="How the dataset lies under root: CoOp's layout (split_zhou JSON, the papers' "
        "splits), or torchvision's dataset classes.")
    download: bool = Field(False, description="torchvision source: let torchvision download the dataset into root.")
    shots: int = Field(16, ge=1, description="Training images per class (K).")
    seed: int = Field(1, description="Seed of the few-shot draw (and of training, unless train.seed is set).")
    augment: bool = Field(
        True, description="Training augmentation (random resized crop + flip) for image files: drawn afresh "
        "per step when the method prompts the vision tower, else from augment_views cached views per image.")
    augment_views: int = Field(
        8, ge=1, description="Frozen-feature methods (coop, cocoop): augmented views per training image, "
        "encoded once and cached; each step picks one view per image.")
    subsample: Literal["base", "all"] = Field(
        "base", description="Train on base classes and test base+novel, or train and test on all classes."
    )

    @model_validator(mode="after")
    def _download_needs_torchvision(self) -> DataSpec:
        if self.download and self.source != "torchvision":
            raise ValueError("data.download needs data.source: torchvision (the CoOp layout is prepared by hand, "
                             "see CoOp's DATASETS.md)")
        return self


class OptimizerSpec(StrictModel):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.002, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD only.")
    nesterov: bool = Field(False, description="SGD only.")
    weight_decay: float = Field(5e-4, ge=0.0)
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW only.")


class ScheduleSpec(StrictModel):
    name: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_epochs: float = Field(0.0, ge=0.0, description="Warmup in epochs (CoOp/MaPLe: 1), added to warmup_steps.")
    warmup_lr: float = Field(1e-5, gt=0.0, description="Constant LR during warmup (CoOp/Dassl style).")


class TemperatureSpec(StrictModel):
    """Temperature-annealed gate sigmoid σ(g/T), T going from start to end over training. The gate
    metrics read σ(g), the temperature left out: annealing alone moves no gate."""

    start: float = Field(1.0, gt=0.0)
    end: float = Field(1.0, gt=0.0)
    schedule: Literal["linear", "cosine", "exponential"] = "linear"


class EquilibriumSpec(StrictModel):
    """Gradient equilibrium (appendix D3): the gradient reaching each gate logit is scaled by
    min(T/(σ(1−σ)+eps), cap), undoing the sigmoid's squashing and the temperature's 1/T, for every
    loss term alike."""

    enabled: bool = False
    eps: float = Field(1e-6, gt=0.0)
    cap: float = Field(10.0, ge=1.0)


class GateTrainingSpec(StrictModel):
    """The gating paper's repair attempts that act on the gates during training."""

    temperature: TemperatureSpec = Field(default_factory=TemperatureSpec)
    entropy_weight: float = Field(
        0.0, ge=0.0, description="Entropy regularization (the gating paper's appendix D3): λ > 0 adds "
        "−λ·Σ H(σ(g/T)) to the loss, rewarding gate entropy, which pushes gates away from saturation (σ near 0 "
        "or 1, where their gradient vanishes) towards 0.5."
    )
    equilibrium: EquilibriumSpec = Field(default_factory=EquilibriumSpec)


class PhasesSpec(StrictModel):
    """Phased training: prompts alone, then gates alone, then everything jointly."""

    warmup: int = Field(0, ge=0, description="First steps train the prompts only (gates frozen).")
    gate_only: int = Field(0, ge=0, description="Then steps that train the gates only (all else frozen).")


class TrainSpec(StrictModel):
    steps: int | None = Field(None, ge=1, description="Optimizer steps per trial (default 100).")
    epochs: float | None = Field(
        None, gt=0, description="Alternative to steps: passes over the few-shot training set."
    )
    batch_size: int = Field(32, ge=1)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    gate_lr_mult: float = Field(1.0, gt=0.0, description="Gate learning rate = lr × this.")
    grad_clip: float | None = Field(None, gt=0.0, description="Clip the global gradient norm (null: off).")
    gates: GateTrainingSpec = Field(default_factory=GateTrainingSpec)
    phases: PhasesSpec = Field(default_factory=PhasesSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    eval_interval: int | str = Field(
        50, description="Evaluate (and report to Optuna) every this many steps, or in epochs: 'epoch', '10 epochs'.")
    seed: int | None = Field(
        None, description="Seed of initialization and batch order (null: data.seed, as CoOp's --seed sets both).")
    device: str = Field("auto", description="auto (CUDA when available), cpu, cuda, cuda:N.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU.")
    compile: bool | Literal["default", "reduce-overhead"] = Field(
        False, description="Compile the training forward and loss with torch.compile: a trial's first step "
        "runs eagerly (keeping the frozen weights in bf16 for the compiled steps under autocast), the second "
        "waits for compilation (seconds when the kernels are in the on-disk cache, up to a minute when not), "
        "every later step is faster. Pays on long trials; on the CPU it needs a C++ compiler. "
        "true is torch.compile's default mode; 'reduce-overhead' also replays the compiled forward and "
        "backward as CUDA graphs (on CUDA; the same as true on the CPU), for steps whose time goes to "
        "launching kernels rather than running them (small prompts on a fast GPU: CoOp on ViT-B/16, "
        "H200, 380 steps/s against 57 eager).")

    @field_validator("eval_interval")
    @classmethod
    def _interval(cls, value: int | str) -> int | str:
        if isinstance(value, int):
            if value < 1:
                raise ValueError("a number of steps >= 1, or 'epoch' / 'N epochs'")
            return value
        if not re.fullmatch(r"(\d+(\.\d+)?\s*)?epochs?", value.strip()):
            raise ValueError(f"{value!r}: a number of steps, or 'epoch' / 'N epochs' (e.g. '10 epochs')")
        return value.strip()

    def eval_steps(self, steps_per_epoch: int) -> int:
        """The evaluation interval in steps."""
        if isinstance(self.eval_interval, int):
            return self.eval_interval
        count = re.match(r"[\d.]*", self.eval_interval).group()  # '' for plain 'epoch'
        return max(1, round(float(count or 1) * steps_per_epoch))

    @model_validator(mode="before")
    @classmethod
    def _steps_or_epochs(cls, data: Any) -> Any:
        if isinstance(data, dict):
            steps, epochs = data.get("steps"), data.get("epochs")
            if steps is not None and epochs is not None:
                raise ValueError("set only one of train.steps and train.epochs (set the other to null)")
            if steps is None and epochs is None:
                data = {**data, "steps": 100}
        return data


class VerdictThresholds(StrictModel):
    """When learned gates count as collapsed (docs/verdicts.md): they do not depend on the input, and
    either ended near their init, or stood still while starved of gradient."""

    gap_log10: float = Field(2.0, description="Starved of gradient: the median grad/gap_log10 over the second "
                             "half of training is at or above this (orders of magnitude).")
    drift: float = Field(0.05, ge=0.0, description="Near their init: the final gate/drift is below this.")
    input_std: float = Field(
        0.01, ge=0.0, validation_alias=AliasChoices("input_std", "batch_std"),
        description="No input dependence: the final gate/input_std (else gate/batch_std) is below this; gates "
        "that do not depend on the input pass by construction. (batch_std is accepted as an alias.)")
    stillness: float = Field(0.01, ge=0.0, description="Standing still: gate/drift and gate/mean each changed by "
                             "less than this between the middle and the end of training.")


class LoggingSpec(StrictModel):
    # Every 10 steps by default: the metrics' trends and the verdict's medians need no more, and a sweep's
    # tracking store and its metric sender (one MLflow row per metric per step) get a tenth of the load.
    diagnostics_every: int = Field(
        10, ge=1, description="Compute gradient/gate diagnostics, and log the step metrics, every N steps "
        "(and at the last step); 1 for every step.")
    system_metrics_interval: float | None = Field(
        10.0, gt=0.0, description="Seconds between MLflow system metrics (CPU, memory, GPU) of a trial; null: off.")
    flush_every: int = Field(50, ge=1, description="Send buffered metrics to MLflow every N steps.")
    gate_swap: bool = Field(
        True, description="At the end of a trial whose method learned gates, evaluate acc/val of the trained "
        "model again with its gates swapped for fixed all-on, random (seeded by the trial's seed, depth "
        "gates included), per-layer (each layer's token gates at their mean) and its own per-token gates: "
        "metrics acc/gates/<strategy>, the paper's Table II from one trained model. Methods without "
        "learned gates log nothing.")
    verdict: VerdictThresholds = Field(default_factory=VerdictThresholds)


# --------------------------------------------------------------------------------------------------
# The spec.

_method_classes = config_classes()
MethodSpec = (
    Annotated[Union[_method_classes], Field(discriminator="name")]  # type: ignore[valid-type]
    if len(_method_classes) > 1
    else _method_classes[0]
)


class StudySpec(StrictModel):
    """A whole study: what each trial trains, how Optuna searches, and where results go."""

    experiment: str | None = Field(None, description="MLflow experiment (default: the study name).")
    description: str = ""
    study: StudySection = Field(default_factory=StudySection)
    method: MethodSpec = Field(default_factory=lambda: method_class("coop").Config())  # type: ignore[valid-type]
    backbone: BackboneSpec = Field(default_factory=BackboneSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    logging: LoggingSpec = Field(default_factory=LoggingSpec)
    search: dict[str, Distribution] = Field(
        default_factory=dict, description="Dotted spec path → Optuna distribution."
    )
    variants: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Named sets of settings, written over the spec like its sections "
        "(a table's rows: each method with its own recipe); `search.variant` picks one per trial.")
    variant: str | None = Field(None, description="The variant a trial's config applies (set per trial).")

    @field_validator("search")
    @classmethod
    def _search_keys(cls, search: dict[str, Any]) -> dict[str, Any]:
        for key in search:
            if key.split(".")[0] in ("study", "search", "experiment", "logging", "variants"):
                raise ValueError(f"{key!r}: only method, backbone, data and train settings can be searched")
        return search

    @model_validator(mode="after")
    def _variants_are_searched(self) -> StudySpec:
        choice = self.search.get("variant")
        if self.variants and choice is None:
            raise ValueError("variants are picked by search.variant (categorical over their names); add it")
        if choice is not None:
            unknown = [c for c in getattr(choice, "choices", [None]) if c not in self.variants]
            if not isinstance(choice, CategoricalDistribution) or unknown:
                raise ValueError(f"search.variant: a categorical over the names in variants "
                                 f"({', '.join(self.variants) or 'none defined'}); unknown: {unknown}")
        return self

    @model_validator(mode="after")
    def _search_paths_exist(self) -> StudySpec:
        resolved = self.model_dump(exclude={"search"})
        for key in self.search:
            if key == "variant":
                continue
            node: Any = resolved
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    raise ValueError(f"search key {key!r} is not a setting of this spec")
                node = node[part]
            if isinstance(node, dict):
                raise ValueError(f"search key {key!r} names a section; search a single setting inside it")
        return self

    @model_validator(mode="after")
    def _grid_is_finite(self) -> StudySpec:
        if self.study.sampler.type == "grid":
            for key, dist in self.search.items():
                if isinstance(dist, FloatDistribution):
                    raise ValueError(f"study.sampler grid: search {key!r} is a float range; "
                                     "use categorical choices or an int range")
        return self

    def grid(self) -> dict[str, list[Any]]:
        """The grid of a grid sampler: every value each searched setting takes."""
        out: dict[str, list[Any]] = {}
        for key, dist in self.search.items():
            if isinstance(dist, CategoricalDistribution):
                out[key] = list(dist.choices)
            elif isinstance(dist, IntDistribution):
                out[key] = list(range(dist.low, dist.high + 1, dist.step))
        return out

    @property
    def name(self) -> str:
        return self.study.name or "study"

    @property
    def train_seed(self) -> int:
        """The seed of initialization and batch order: train.seed, else data.seed."""
        return self.train.seed if self.train.seed is not None else self.data.seed

    @property
    def t_target(self) -> float | None:
        """The pruning target of methods that prune (ADAPT), for the ``pruned`` verdict."""
        return getattr(self.method, "t_target", None)

    @property
    def experiment_name(self) -> str:
        return self.experiment or self.name

    def to_yaml(self) -> str:
        """The resolved spec (every default filled in) as YAML."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat_params(self) -> dict[str, str]:
        """The resolved config as dotted keys → canonical strings (MLflow params)."""
        dumped = self.model_dump(mode="json", exclude={"search", "variants"})
        return {k: _canonical(v) for k, v in flatten(dumped).items()}

    def with_values(self, values: dict[str, Any]) -> StudySpec:
        """A trial's config: a copy with ``values`` (dotted path → value) written in, validated again;
        ``values["variant"]`` first writes that variant's settings (the other values win over it).
        It searches nothing itself, so its search block and variants are empty."""
        data = self.model_dump(mode="json")
        data["search"], data["variants"] = {}, {}
        if "variant" in values:
            data = _deep_merge(data, self.variants[values["variant"]])
            data["variant"] = values["variant"]
        for key, value in values.items():
            if key != "variant":
                set_dotted(data, key, value)
        if data["method"]["name"] != self.method.name:
            # Switching method (e.g. a search over method.name) keeps the settings the new one has.
            try:
                fields = method_class(data["method"]["name"]).Config.model_fields
            except KeyError:
                fields = None  # let validation name the unknown method
            if fields is not None:
                data["method"] = {k: v for k, v in data["method"].items() if k in fields}
        return StudySpec.model_validate(data)


# --------------------------------------------------------------------------------------------------
# Loading, overrides, errors.


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    # extra written over base, section by section.
    out = dict(base)
    for key, value in extra.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _deep_merge(out[key], value) if nested else value
    return out


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts → {"a.b.c": value}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _canonical(value: Any) -> str:
    # One string form per value, so a resumed trial never re-logs a param as '7' vs '7.0'.
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return "null" if value is None else str(value)


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Write ``value`` at dotted ``key`` in nested dicts, creating sections as needed."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_assignment(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` → (key, YAML-parsed value); ``train.steps=20`` gives 20, ``x=null`` gives None."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. train.steps=20")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _study_dirs() -> list[Path]:
    # ./studies of the working directory first (a user's own), then the ones mlgate ships.
    return list(dict.fromkeys([Path.cwd() / "studies", STUDIES_DIR]))


def study_name(path: Path) -> str:
    """A shipped spec's name: its path under ``studies/`` without .yaml (``paper/gating_table1``)."""
    for folder in _study_dirs():
        if path.is_relative_to(folder):
            return path.relative_to(folder).with_suffix("").as_posix()
    return path.stem


def list_studies() -> list[Path]:
    """The spec files in ``studies/`` and its subfolders (one per name; the working directory's win)."""
    found: dict[str, Path] = {}
    for folder in _study_dirs():
        for path in sorted(folder.rglob("*.yaml")) if folder.is_dir() else []:
            found.setdefault(path.relative_to(folder).with_suffix("").as_posix(), path)
    return [found[name] for name in sorted(found)]


def resolve_study_path(study: str) -> Path:
    """A study name from ``studies/`` (without .yaml) or a path to a YAML file."""
    candidate = Path(study)
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        if not candidate.is_file():
            raise SpecError(f"{study}: no such spec file.")
        return candidate
    for folder in _study_dirs():
        path = folder / f"{study}.yaml"
        if path.is_file():
            return path
    names = ", ".join(study_name(p) for p in list_studies()) or "(none)"
    raise SpecError(f"{study}: no study of that name in studies/ and no such file. Known studies: {names}.")


def _format_loc(loc: tuple[Any, ...]) -> str:
    # Drop pydantic's union-member tags (e.g. 'coop', 'float', 'function-after[...]') from the path.
    parts = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS))]
    return ".".join(parts) or "(top level)"


_UNION_TAGS = {"float", "int", "categorical", *(get_args(k.model_fields["type"].annotation)[0] for k in (*SAMPLERS, *PRUNERS)),
               *(c.model_fields["name"].default for c in _method_classes)}


def readable_problems(exc: ValidationError) -> list[str]:
    """One line per validation problem: the dotted field path, what is wrong, and the value given."""
    problems = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        where = _format_loc(err["loc"])
        if err["type"] == "extra_forbidden":
            msg = "unknown setting (check the spelling; `mlgate schema` lists every valid key)"
        if err["type"] not in ("extra_forbidden", "missing") and "input" in err and not isinstance(err["input"], dict):
            msg += f" (got {err['input']!r})"
        problems.append(f"{where}: {msg}")
    return problems


def validate_data(data: dict[str, Any], source: str) -> StudySpec:
    """Validate raw spec data; every problem is reported at once as a :class:`SpecError`."""
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(f"{source}: invalid study spec.", readable_problems(exc)) from None
    problems = _check_search_values(spec)
    problems = problems or schedule_problems(spec)
    if problems:
        raise SpecError(f"{source}: invalid study spec.", problems)
    return spec


def _check_search_values(spec: StudySpec) -> list[str]:
    # Every value the sampler can draw must give a valid trial config: check bounds and each choice.
    problems = []
    for key, dist in spec.search.items():
        probes = dist.choices if isinstance(dist, CategoricalDistribution) else [dist.low, dist.high]
        for value in probes:
            try:
                spec.with_values({key: value})
            except ValidationError as exc:
                detail = "; ".join(readable_problems(exc))
                problems.append(f"search.{key}: value {value!r} would make an invalid trial config ({detail})")
    return problems


# Settings that ADAPT's pruning schedule depends on (a variant may set any of them).
_SCHEDULE_KEYS = ("variant", "method.", "backbone.name", "data.name", "data.shots", "data.subsample",
                  "train.steps", "train.epochs", "train.batch_size")


def _probe_values(dist: Any) -> list[Any]:
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution):
        return [dist.low, dist.low + (dist.high - dist.low) // dist.step * dist.step]
    return [dist.low, dist.high]


def schedule_configs(spec: StudySpec) -> list[tuple[dict[str, Any], StudySpec]]:
    """The trial configs a search can produce, as ADAPT's pruning schedule tells them apart: every
    combination of the searched choices and of both ends of searched ranges (whether a schedule
    finishes is monotone in each number it depends on), as (values, config); the spec itself when
    nothing it depends on is searched."""
    keys = [k for k in spec.search if k == "variant" or k.startswith(_SCHEDULE_KEYS)]
    configs = []
    for combo in itertools.product(*(_probe_values(spec.search[k]) for k in keys)):
        values = dict(zip(keys, combo))
        try:
            configs.append((values, spec.with_values(values) if values else spec))
        except ValidationError:
            continue  # (_check_search_values reports it)
    return configs


def schedule_problems(spec: StudySpec, layers: int | None = None, n_train: int | None = None) -> list[str]:
    """Every trial config whose ADAPT pruning cannot reach its target or prunes nothing, one line
    each. ``layers`` and ``n_train`` are the spec's own backbone's layers and its own data's training
    images where known (the preflight's exact numbers); otherwise they are looked up without torch
    (model-config JSON, known datasets' class counts), and a config whose numbers are unknown is skipped."""
    problems = []
    for values, config in schedule_configs(spec):
        config_layers = layers if layers is not None and config.backbone.name == spec.backbone.name \
            else backbone_layers(config.backbone.name)
        config_images = n_train if n_train is not None and config.data == spec.data else training_images(config.data)
        problem = trial_problem(config, config_layers, config_images)
        if problem:
            where = ", ".join(f"{k}={v}" for k, v in values.items())
            problems.append(f"search ({where}): {problem}" if where else problem)
    if len(problems) > 6:  # the first few say what is wrong; the count, how widely
        problems = [*problems[:5], f"... and {len(problems) - 5} more trial configs like these"]
    return problems


def load_spec(study: str | Path, overrides: list[str] | None = None) -> StudySpec:
    """Load, override (``--set`` style ``KEY=VALUE`` strings) and validate a spec."""
    path = resolve_study_path(str(study))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{path}:{where} not valid YAML ({getattr(exc, 'problem', exc)}).") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the spec ({exc.strerror}).") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a study spec is a YAML mapping with sections study, method, train, ...")
    data = copy.deepcopy(data)
    data.setdefault("study", {})
    if isinstance(data["study"], dict):
        data["study"].setdefault("name", path.stem)
    source = str(path)
    for text in overrides or []:
        key, value = parse_assignment(text)
        set_dotted(data, key, value)
    if overrides:
        source += " with --set " + " ".join(overrides)
    return validate_data(data, source)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a study spec."""
    return StudySpec.model_json_schema()
