"""Loading a study spec: YAML, ``--set`` overrides, validation, and problems as readable lines."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import ValidationError

from mlgate.config.dotted import parse_assignment, set_dotted
from mlgate.config.methods import METHOD_CONFIGS
from mlgate.config.pruning import backbone_layers, training_images, trial_problem
from mlgate.config.search import PRUNERS, SAMPLERS, CategoricalDistribution, IntDistribution
from mlgate.config.spec import StudySpec
from mlgate.config.studies import resolve_study_path
from mlgate.errors import SpecError


def _format_loc(loc: tuple[Any, ...]) -> str:
    # Drop pydantic's union-member tags (e.g. 'coop', 'float', 'function-after[...]') from the path.
    parts = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS))]
    return ".".join(parts) or "(top level)"


_UNION_TAGS = {"float", "int", "categorical", *(get_args(k.model_fields["type"].annotation)[0] for k in (*SAMPLERS, *PRUNERS)),
               *METHOD_CONFIGS}


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
    problems = _check_search_values(spec) + _check_baselines(spec)
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


def _check_baselines(spec: StudySpec) -> list[str]:
    # A baseline must give a valid trial config that holds every searched setting inside the search space.
    problems = []
    for name in spec.baselines:
        try:
            values = spec.baseline_values(name)
        except ValidationError as exc:
            detail = "; ".join(readable_problems(exc))
            problems.append(f"baselines.{name}: would make an invalid trial config ({detail})")
            continue
        problems += [f"baselines.{name}: {key} is {value!r}, outside search.{key}; a baseline holds each searched "
                     "setting at a value the search can take" for key, value in values.items()
                     if key != "variant" and not spec.search[key].contains(value)]
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
    nothing it depends on is searched; and each baseline's."""
    keys = [k for k in spec.search if k == "variant" or k.startswith(_SCHEDULE_KEYS)]
    probes = [dict(zip(keys, combo)) for combo in itertools.product(*(_probe_values(spec.search[k]) for k in keys))]
    configs = []
    for values in probes + [{"baseline": name} for name in spec.baselines]:
        try:
            configs.append((values, spec.with_values(values) if values else spec))
        except ValidationError:
            continue  # (_check_search_values and _check_baselines report it)
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
