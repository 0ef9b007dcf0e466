"""mlgate's MLflow layout (``runs``), the metric sender process (``sender``) and the run-context
provider (``run_context``). Nothing is imported here: MLflow loads ``run_context`` while it is
itself being imported, so that module must not pull in MLflow's client through this package."""
