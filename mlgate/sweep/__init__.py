"""Optuna sweeps: a study spec's trials run, shared between workers, and summarized."""

from mlgate.sweep.study import close_study, open_study, run_study

__all__ = ["close_study", "open_study", "run_study"]
