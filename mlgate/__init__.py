"""mlgate: MLflow + Optuna sweeps for CLIP prompt learning — does the adaptive prompt really adapt?"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["monitor", "__version__"]


def __getattr__(name: str):
    # Lazy, so `mlgate list` and friends do not import torch and MLflow just to start.
    if name == "monitor":
        from mlgate.monitoring import monitor

        return monitor
    raise AttributeError(f"module 'mlgate' has no attribute {name!r}")
