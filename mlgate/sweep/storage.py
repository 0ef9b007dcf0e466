"""Optuna storages from a URL: RDB databases, or a journal file beside the MLflow store (the default)."""

from __future__ import annotations

import time
from pathlib import Path

import optuna

from mlgate.errors import MlgateError
from mlgate.tracking.runs import redact


def default_storage_path(tracking_uri: str) -> Path:
    """The journal file beside a SQLite MLflow db (``mlflow.db`` → ``mlflow.optuna.journal``), else in cwd."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return db.with_name(db.stem + ".optuna.journal")
    return Path.cwd() / "mlgate.optuna.journal"


def make_storage(url: str | None, tracking_uri: str) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL: RDB URLs (sqlite://, postgresql://, mysql://) as they are,
    ``journal:PATH`` or a ``*.journal`` path as a journal file (the default, safe for several processes)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if url is None or url.startswith("journal:") or url.endswith(".journal"):
        path = default_storage_path(tracking_uri) if url is None else Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise MlgateError(
            f"--storage {redact(url)!r}: not an Optuna storage URL. Use sqlite:///path.db, "
            "postgresql://user@host/db, mysql://..., or journal:/path/to/file.journal."
        )
    kwargs = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else None
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except Exception as exc:  # noqa: BLE001 - workers starting together race to create the tables
            error = exc
            time.sleep(0.5 * (attempt + 1))
    raise MlgateError(f"--storage {redact(url)!r}: cannot open the Optuna storage ({redact(str(error))}).") from None
