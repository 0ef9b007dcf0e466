"""Study specs: what each trial trains (method, backbone, data, training, logging), how Optuna
searches (``search``, ``variants``), and where results go. Pydantic models, torch-free.

A trial's config is the spec with the sampled values written at their dotted paths, validated again
(:meth:`StudySpec.with_values`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import AliasChoices, Field, field_validator, model_validator

from mlgate.config.dotted import canonical, deep_merge, flatten, set_dotted
from mlgate.config.base import StrictModel
from mlgate.config.datasets import DATASETS, dataset_names
from mlgate.config.methods import METHOD_CONFIGS, method_config_class
from mlgate.config.search import (CategoricalDistribution, Distribution, FloatDistribution, IntDistribution,
                                  PrunerSpec, SamplerSpec, TPESamplerSpec, MedianPrunerSpec)



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
    name: str = Field("shapes", description="Dataset name: the bundled 'shapes' and 'digits', the CoOp layouts "
                      "(eurosat, caltech101, dtd, oxford_pets, oxford_flowers, food101, stanford_cars, sun397, "
                      "ucf101), fgvc_aircraft, imagenet, imagefolder (docs/datasets.md).")
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

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(dataset_names())}")
        return name

    @model_validator(mode="after")
    def _torchvision_has_it(self) -> DataSpec:
        if self.source == "torchvision" and not DATASETS[self.name].torchvision:
            readable = ", ".join(n for n, info in sorted(DATASETS.items()) if info.torchvision)
            raise ValueError(f"data.source torchvision: torchvision has no {self.name!r}; it reads {readable}")
        return self

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
    device: str = Field("auto", description="auto (CUDA when available), cpu, mps, cuda, cuda:N.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU.")
    compile: bool | Literal["default", "reduce-overhead"] = Field(
        False, description="Compile the training forward and loss with torch.compile: a trial's first step "
        "runs eagerly (keeping the frozen weights in bf16 for the compiled steps under autocast), the second "
        "waits for compilation (seconds when the kernels are in the on-disk cache, up to a minute when not), "
        "every later step is faster. Pays on long trials; on the CPU it needs a C++ compiler. "
        "true is torch.compile's default mode; 'reduce-overhead' also replays the compiled forward and "
        "backward as CUDA graphs (on CUDA; the same as true on the CPU), for steps whose time goes to "
        "launching kernels rather than running them (small prompts on a fast GPU; docs/performance.md).")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError("one of auto, cpu, mps, cuda, cuda:N")
        return value

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
    detail_every: int = Field(
        5, ge=1, description="Send the diagnostics outside the headline ones (loss/total, grad/prompt_norm, "
        "grad/gate_norm and what the verdict reads) to MLflow every N-th diagnostics step (and at the last "
        "step): per-depth series, the loss's parts, gate min/max/entropy/cancellation, method-specific "
        "metrics. Every value of every step lands in the trial's metrics/history.csv artifact; 1: all as "
        "metrics.")
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


MethodSpec = Annotated[Union[tuple(METHOD_CONFIGS.values())], Field(discriminator="name")]  # type: ignore[valid-type]


class StudySpec(StrictModel):
    """A whole study: what each trial trains, how Optuna searches, and where results go."""

    experiment: str | None = Field(None, description="MLflow experiment (default: the study name).")
    description: str = ""
    study: StudySection = Field(default_factory=StudySection)
    method: MethodSpec = Field(default_factory=lambda: METHOD_CONFIGS["coop"]())  # type: ignore[valid-type]
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
    baselines: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Fixed trials that run before the search, the reference points "
        "compare reads gains and verdicts against: name → settings written over the spec (like variants; "
        "with variants, a baseline names its own `variant`). Each is queued once and counts towards "
        "study.n_trials; its searched settings are held at its own values, which must lie in the search "
        "space. Its run is tagged mlgate.baseline.")
    baseline: str | None = Field(None, description="The baseline a trial's config applies (set per trial).")

    @field_validator("search")
    @classmethod
    def _search_keys(cls, search: dict[str, Any]) -> dict[str, Any]:
        for key in search:
            if key.split(".")[0] in ("study", "search", "experiment", "logging", "variants", "baselines", "baseline"):
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
    def _baselines_set_trial_settings(self) -> StudySpec:
        for name, settings in self.baselines.items():
            outside = [k for k in settings if k not in ("method", "backbone", "data", "train", "variant")]
            if outside:
                raise ValueError(f"baselines.{name}: {', '.join(outside)}: a baseline sets method, backbone, data "
                                 "and train settings, and its variant")
            variant = settings.get("variant")
            if "variant" in self.search and variant not in self.variants:
                raise ValueError(f"baselines.{name}: name one of the variants ({', '.join(self.variants)}) "
                                 f"as its variant (got {variant!r})")
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
        dumped = self.model_dump(mode="json", exclude={"search", "variants", "baselines"})
        return {k: canonical(v) for k, v in flatten(dumped).items()}

    def with_values(self, values: dict[str, Any]) -> StudySpec:
        """A trial's config: a copy with ``values`` (dotted path → value) written in, validated again.
        ``values["variant"]`` first writes that variant's settings, ``values["baseline"]`` then that
        baseline's (and its variant's, when it names one); the other values win over both.
        It searches nothing itself, so its search block, variants and baselines are empty."""
        data = self.model_dump(mode="json")
        data["search"], data["variants"], data["baselines"] = {}, {}, {}
        baseline = dict(self.baselines[values["baseline"]]) if values.get("baseline") is not None else {}
        variant = values.get("variant", baseline.pop("variant", None))
        if variant is not None:
            data = deep_merge(data, self.variants[variant])
            data["variant"] = variant
        if values.get("baseline") is not None:
            data = deep_merge(data, baseline)
            data["baseline"] = values["baseline"]
        for key, value in values.items():
            if key not in ("variant", "baseline"):
                set_dotted(data, key, value)
        if data["method"]["name"] != self.method.name:
            # Switching method (e.g. a search over method.name) keeps the settings the new one has.
            try:
                fields = method_config_class(data["method"]["name"]).model_fields
            except KeyError:
                fields = None  # let validation name the unknown method
            if fields is not None:
                data["method"] = {k: v for k, v in data["method"].items() if k in fields}
        return StudySpec.model_validate(data)

    def baseline_values(self, name: str) -> dict[str, Any]:
        """The values of the searched settings in baseline ``name``'s config: what its trial holds them at."""
        config = self.with_values({"baseline": name})
        flat = flatten(config.model_dump(mode="json"))
        return {key: config.variant if key == "variant" else flat[key] for key in self.search}
