"""Training one trial: the loop (``loop``), one optimizer step (``step``), evaluation, batches, the
frozen-feature cache and the trial's images. Nothing here knows Optuna or MLflow."""

from mlgate.training.evaluation import EVAL_METRICS
from mlgate.training.loop import NullSink, Sink, TrialOutcome, load_data, preflight, train

__all__ = ["EVAL_METRICS", "NullSink", "Sink", "TrialOutcome", "load_data", "preflight", "train"]
