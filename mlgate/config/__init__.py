"""Study specs, torch-free: their sections (``spec``), the methods' settings (``methods``), the search
space, samplers and pruners (``search``), the datasets (``datasets``), ADAPT's pruning arithmetic
(``pruning``), and loading specs from ``studies/`` (``loading``, ``studies``)."""

from mlgate.config.loading import json_schema, load_spec, readable_problems, validate_data
from mlgate.config.spec import StudySpec
from mlgate.config.studies import list_studies, resolve_study_path, study_name

__all__ = ["StudySpec", "json_schema", "list_studies", "load_spec", "readable_problems", "resolve_study_path",
           "study_name", "validate_data"]
