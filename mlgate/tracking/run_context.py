"""MLflow run-context provider (entry point ``mlflow.run_context_provider``): runs started in the
mlgate context carry its tags — mlgate version, device, torch and CUDA versions, git state."""

from __future__ import annotations

import os
import subprocess
from functools import lru_cache

from mlflow.tracking.context.abstract_context import RunContextProvider

from mlgate import __version__

CONTEXT_ENV = "MLGATE_CONTEXT"  # set by the mlgate CLI, so its subprocesses are in context too


def git_dirty(path: str | None = None) -> str | None:
    """'true' / 'false' for a git work tree with / without uncommitted changes; None outside git."""
    try:
        out = subprocess.run(["git", "status", "--porcelain"], cwd=path, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return None if out.returncode != 0 else str(bool(out.stdout.strip())).lower()


@lru_cache(maxsize=1)
def context_tags() -> dict[str, str]:
    """The tags every mlgate run carries (computed once per process)."""
    import torch

    tags = {
        "mlgate.version": __version__,
        "mlgate.device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "mlgate.torch": torch.__version__,
        "mlgate.cuda": torch.version.cuda or "none",
    }
    dirty = git_dirty(os.getcwd())  # the project being run (mlflow run . runs in it)
    if dirty is not None:
        tags["mlgate.git_dirty"] = dirty
    return tags


class MlgateRunContextProvider(RunContextProvider):
    """Adds :func:`context_tags` to runs created while mlgate runs (``MLGATE_CONTEXT`` is set)."""

    def in_context(self) -> bool:
        return os.environ.get(CONTEXT_ENV) == "1"

    def tags(self) -> dict[str, str]:
        return dict(context_tags())
