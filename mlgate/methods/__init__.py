"""Prompt-learning methods: one module each on the shared prompted forward of :mod:`mlgate.model`.

Their settings live in :mod:`mlgate.config.methods` (torch-free, for the spec); each module registers its
class with ``@register`` (:mod:`mlgate.methods._registry`).
"""

from mlgate.methods._registry import build_method, method_class, method_names, register
from mlgate.methods.base import PromptMethod

__all__ = ["PromptMethod", "build_method", "method_class", "method_names", "register"]
