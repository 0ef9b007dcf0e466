"""mlgate: MLflow + Optuna sweeps for CLIP prompt learning — does the adaptive prompt really adapt?"""

__version__ = "0.1.0"
