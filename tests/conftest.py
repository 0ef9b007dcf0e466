"""Shared fixtures: every test gets its own working directory, MLflow store and Optuna storage."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

# Small but real: the embedded backbone, the bundled dataset, a handful of steps.
TINY = {
    "study": {"n_trials": 2, "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "none"}},
    "method": {"name": "coop", "n_ctx": 4},
    "data": {"shots": 4},
    "train": {"steps": 6, "batch_size": 8, "eval_interval": 3, "optimizer": {"lr": 0.01}},
    "logging": {"flush_every": 2},
    "search": {"train.gate_lr_mult": {"type": "float", "low": 1.0, "high": 100.0, "log": True}},
}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working directory; the default MLflow store (sqlite:///mlflow.db) lands in it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    return tmp_path


def deep_update(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        merge = isinstance(value, dict) and value and isinstance(out.get(key), dict)  # {} replaces
        out[key] = deep_update(out[key], value) if merge else value
    return out


@pytest.fixture
def write_spec(workdir: Path):
    """Write a spec (TINY updated with the given sections) as studies/<name>.yaml; returns its path."""

    def write(name: str = "tiny", **sections) -> Path:
        data = deep_update(TINY, sections)
        path = workdir / "studies" / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(data))
        return path

    return write
