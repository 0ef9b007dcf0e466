"""Study specs: validation, error messages, overrides, the validate/list/schema commands."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import yaml

from mlgate.cli import main
from mlgate.errors import SpecError
from mlgate.config.spec import StudySpec
from mlgate.config import list_studies, load_spec
from tests.conftest import REPO, TINY, deep_update


@pytest.mark.parametrize("path", list_studies(), ids=lambda p: p.stem)
def test_shipped_studies_are_valid(path):
    spec = load_spec(path)
    assert spec.name == path.stem
    assert spec.study.n_trials >= 1


def test_defaults_fill_every_section():
    spec = StudySpec()
    assert spec.method.name == "coop"
    assert spec.backbone.name == "mlgate-tiny"
    assert spec.train.steps == 100
    assert spec.experiment_name == spec.name


def test_set_overrides_are_parsed_and_validated(write_spec):
    path = write_spec()
    spec = load_spec(path, ["train.steps=20", "study.n_trials=5", "train.grad_clip=null", "method.n_ctx=2",
                            "method.ctx_init=a photo"])
    assert (spec.train.steps, spec.study.n_trials, spec.train.grad_clip, spec.method.n_ctx) == (20, 5, None, 2)
    with pytest.raises(SpecError) as err:
        load_spec(path, ["train.stepz=20"])
    assert "train.stepz" in str(err.value) and "unknown setting" in str(err.value)


@pytest.mark.parametrize(
    "search, expected",
    [
        ({"train.gate_lr_mult": {"type": "float", "low": 1.0, "high": 10.0, "log": True, "step": 1.0}},
         "log and step cannot both be set"),
        ({"train.gate_lr_mult": {"type": "float", "low": 0.0, "high": 10.0, "log": True}}, "low > 0"),
        ({"train.steps": {"type": "int", "low": 10, "high": 5}}, "low (10) must be <= high (5)"),
        ({"train.grad_clip": {"type": "categorical", "choices": []}}, "at least 1 item"),
        ({"train.nonexistent": {"type": "float", "low": 0.0, "high": 1.0}}, "not a setting of this spec"),
        ({"train.optimizer": {"type": "categorical", "choices": ["sgd"]}}, "names a section"),
        ({"train.optimizer.name": {"type": "categorical", "choices": ["sgd", "adam"]}}, "value 'adam'"),
        ({"train.gate_lr_mult": {"type": "gaussian", "low": 0.0, "high": 1.0}}, "search.train.gate_lr_mult"),
        ({"study.n_trials": {"type": "int", "low": 1, "high": 3}}, "can be searched"),
    ],
)
def test_search_rules_follow_optuna(write_spec, search, expected):
    path = write_spec(search=search)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert str(path) in message
    assert expected in message


def test_every_problem_is_reported_with_its_field(write_spec):
    path = write_spec(train={"batch_size": 0, "optimizr": {}}, method={"n_ctx": "four"})
    with pytest.raises(SpecError) as err:
        load_spec(path)
    problems = err.value.problems
    assert any(p.startswith("train.batch_size:") for p in problems)
    assert any(p.startswith("train.optimizr:") for p in problems)
    assert any(p.startswith("method.n_ctx:") for p in problems)


def test_validate_command_exit_codes(write_spec, capsys):
    good = write_spec("good")
    bad = write_spec("bad", train={"steps": -1})
    assert main(["validate", str(good)]) == 0
    assert main(["validate", str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "train.steps" in err and "Traceback" not in err


def test_bad_yaml_and_unknown_study_are_readable(workdir):
    broken = workdir / "broken.yaml"
    broken.write_text("study: {n_trials: 2\ntrain: [")
    result = subprocess.run([sys.executable, "-m", "mlgate", "validate", str(broken), "no_such_study"],
                            capture_output=True, text=True, cwd=workdir)
    assert result.returncode == 2
    assert "broken.yaml" in result.stderr and "not valid YAML" in result.stderr
    assert "no_such_study" in result.stderr and "gradient_balancing" in result.stderr
    assert "Traceback" not in result.stderr


def test_list_and_schema(capsys):
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "gradient_balancing" in listed
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"study", "method", "train", "search"} <= set(schema["properties"])


def test_flat_params_are_canonical_dotted_keys():
    params = StudySpec().flat_params()
    assert params["train.optimizer.lr"] == "0.002"
    assert params["train.grad_clip"] == "null"
    assert params["method.gate.enabled"] == "True"
    assert "search" not in " ".join(params)


def test_gradient_balancing_covers_the_issue_sweep():
    data = yaml.safe_load((REPO / "studies" / "gradient_balancing.yaml").read_text())
    search = data["search"]
    assert search["train.gate_lr_mult"]["log"] is True and search["train.gate_lr_mult"]["high"] == 100.0
    assert None in search["train.grad_clip"]["choices"]
    assert set(search["train.optimizer.name"]["choices"]) == {"sgd", "adamw"}
    assert any(k.startswith("method.gate.init") for k in search)


VARIANTS = {
    "study": {"sampler": {"type": "grid"}},
    "method": {"name": "coop", "n_ctx": 4, "gate": {"enabled": True}},
    "variants": {
        "MaPLe": {"method": {"name": "maple", "depth": 3}, "train": {"optimizer": {"lr": 0.0035}}},
        "CoOp-gated": {"train": {"batch_size": 16}},
    },
    "search": {"variant": {"type": "categorical", "choices": ["MaPLe", "CoOp-gated"]},
               "data.seed": {"type": "categorical", "choices": [1, 2]}},
}


def _variants_spec(workdir, data: dict):
    # TINY with its search replaced (a grid cannot take TINY's float range).
    path = workdir / "variants.yaml"
    path.write_text(yaml.safe_dump(deep_update({k: v for k, v in TINY.items() if k != "search"}, data)))
    return path


def test_variants_are_a_tables_rows(workdir):
    spec = load_spec(_variants_spec(workdir, VARIANTS))
    assert spec.grid() == {"variant": ["MaPLe", "CoOp-gated"], "data.seed": [1, 2]}
    maple = spec.with_values({"variant": "MaPLe", "data.seed": 2})
    assert (maple.method.name, maple.method.depth, maple.method.n_ctx) == ("maple", 3, 4)  # n_ctx kept
    assert maple.train.optimizer.lr == 0.0035 and maple.data.seed == 2 and maple.train_seed == 2
    params = maple.flat_params()
    assert params["variant"] == "MaPLe" and not any(k.startswith("variants") for k in params)
    coop = spec.with_values({"variant": "CoOp-gated", "train.batch_size": 8})  # searched values win
    assert coop.method.name == "coop" and coop.train.batch_size == 8 and coop.train.optimizer.lr == 0.01


def test_variant_problems_are_named(workdir):
    bad = {**VARIANTS, "variants": {**VARIANTS["variants"], "MaPLe": {"method": {"name": "maple", "depth": 0}}}}
    with pytest.raises(SpecError) as err:
        load_spec(_variants_spec(workdir, bad))
    assert "search.variant: value 'MaPLe'" in str(err.value) and "depth" in str(err.value)
    unknown = {**VARIANTS, "search": {"variant": {"type": "categorical", "choices": ["MaPLe", "Nope"]}}}
    with pytest.raises(SpecError, match="unknown: \\['Nope'\\]"):
        load_spec(_variants_spec(workdir, unknown))
    with pytest.raises(SpecError, match="picked by search.variant"):
        load_spec(_variants_spec(workdir, {**VARIANTS, "search": {}}))


def test_paper_studies_are_listed_by_their_path(capsys):
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "paper/gating_table1" in listed and "paper/adapt_table2" in listed
    spec = load_spec("paper/gating_table1")
    assert spec.backbone.name == "ViT-B-16-quickgelu" and spec.backbone.pretrained == "openai"
    grid = spec.grid()
    assert set(grid["data.seed"]) == {1, 2, 3} and spec.study.n_trials == math.prod(len(v) for v in grid.values())


BASELINES = {
    "reference": {"train": {"optimizer": {"lr": 0.002}}},
    "no_gates": {"method": {"gate": {"enabled": False}}, "train": {"optimizer": {"lr": 0.002}}},
}


def test_baselines_are_fixed_trials_held_inside_the_search_space(write_spec):
    spec = load_spec(write_spec(baselines=BASELINES))
    assert set(spec.baselines) == {"reference", "no_gates"}
    assert spec.baseline_values("no_gates") == {"train.gate_lr_mult": 1.0}
    config = spec.with_values({"baseline": "no_gates", "train.gate_lr_mult": 1.0})
    assert config.method.gate.enabled is False and config.train.optimizer.lr == 0.002
    assert config.baseline == "no_gates" and config.flat_params()["baseline"] == "no_gates"
    assert not config.baselines and not any(k.startswith("baselines") for k in spec.flat_params())


@pytest.mark.parametrize("baselines, message", [
    ({"fast": {"train": {"gate_lr_mult": 500.0}}}, "baselines.fast: train.gate_lr_mult is 500.0, outside"),
    ({"bad": {"train": {"steps": 0}}}, "baselines.bad: would make an invalid trial config (train.steps"),
    ({"odd": {"study": {"n_trials": 3}}}, "baselines.odd: study: a baseline sets method, backbone, data"),
], ids=["outside the search", "invalid config", "not a trial setting"])
def test_baseline_problems_are_named(write_spec, baselines, message):
    with pytest.raises(SpecError) as err:
        load_spec(write_spec(baselines=baselines))
    assert message in str(err.value)


def test_a_baseline_of_a_study_with_variants_names_its_variant(workdir):
    with pytest.raises(SpecError, match="baselines.plain: name one of the variants"):
        load_spec(_variants_spec(workdir, {**VARIANTS, "baselines": {"plain": {"train": {"batch_size": 4}}}}))
    spec = load_spec(_variants_spec(workdir, {**VARIANTS, "baselines": {
        "maple_no_depth": {"variant": "MaPLe", "method": {"depth": 1}}}}))
    assert spec.baseline_values("maple_no_depth") == {"variant": "MaPLe", "data.seed": 1}
    config = spec.with_values({"baseline": "maple_no_depth", **spec.baseline_values("maple_no_depth")})
    assert (config.method.name, config.method.depth, config.train.optimizer.lr) == ("maple", 1, 0.0035)


def test_gradient_balancing_has_the_reference_recipe_as_its_baselines():
    spec = load_spec("gradient_balancing")
    reference, no_gates = (spec.with_values({"baseline": name}) for name in ("reference", "no_gates"))
    for config in (reference, no_gates):
        train = config.train
        recipe = (train.optimizer.name, train.optimizer.lr, train.gate_lr_mult, train.grad_clip)
        assert recipe == ("sgd", 0.002, 1.0, None)
        assert train.gates.temperature.end == 1.0 and train.gates.entropy_weight == 0.0
        assert not train.gates.equilibrium.enabled and train.phases.warmup == train.phases.gate_only == 0
    assert reference.method.gate.enabled and not no_gates.method.gate.enabled
