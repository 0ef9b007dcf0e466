"""Shared fixtures: every test gets its own working directory, MLflow store and Optuna storage."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

# Small but real: the embedded backbone, the bundled dataset, a handful of steps.
TINY = {
    "study": {"n_trials": 2, "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "none"}},
    "method": {"name": "coop"},
    "data": {"shots": 4},
    "train": {"steps": 6, "batch_size": 8, "eval_interval": 3, "optimizer": {"lr": 0.01}},
    "logging": {"flush_every": 2, "diagnostics_every": 1},  # every step's metrics: tests look at them
    "search": {"train.gate_lr_mult": {"type": "float", "low": 1.0, "high": 100.0, "log": True}},
}


@pytest.fixture(autouse=True, scope="session")
def _feature_cache(tmp_path_factory):
    """The frozen-feature cache of the whole test session lives in a temp dir, not in ~/.cache."""
    import os

    os.environ["MLGATE_CACHE_DIR"] = str(tmp_path_factory.mktemp("mlgate-cache"))


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


@pytest.fixture
def postgres_url():
    """A fresh PostgreSQL database on 127.0.0.1:5432 for one test, dropped afterwards."""
    import uuid

    psycopg = pytest.importorskip("psycopg", reason="PostgreSQL tests need psycopg (the test extras)")
    try:
        admin = psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL server at 127.0.0.1:5432 ({exc})")
    admin.autocommit = True
    name = f"mlgate_test_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            cur.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.close()


def start_mlflow_server(workdir: Path, backend_uri: str, port: int | None = None):
    """`mlflow server` on 127.0.0.1 over ``backend_uri``; returns (process, url) once it answers."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", backend_uri, "--artifacts-destination", str(workdir / "artifacts"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=workdir,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("mlflow server did not start") from None
            time.sleep(0.5)


def stop(proc) -> None:
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def mlflow_server(workdir, postgres_url):
    """`mlflow server` on 127.0.0.1 (a free port) over a PostgreSQL backend store; yields its URL."""
    proc, url = start_mlflow_server(workdir, postgres_url)
    try:
        yield url
    finally:
        stop(proc)
