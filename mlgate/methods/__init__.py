"""Registry of prompt-learning methods (in the spirit of timm's ``register_model``).

``@register("coop")`` on a :class:`PromptMethod` subclass makes the name usable in a study spec's
``method.name`` and in ``mlgate describe``; its ``Config`` becomes part of the spec schema.
"""

from __future__ import annotations

from typing import Any, Callable

from mlgate.methods.base import GateConfig, MethodConfig, PromptMethod

_REGISTRY: dict[str, type[PromptMethod]] = {}


def register(name: str) -> Callable[[type[PromptMethod]], type[PromptMethod]]:
    """Class decorator: register a method under ``name`` (must match its Config's ``name`` literal)."""

    def wrap(cls: type[PromptMethod]) -> type[PromptMethod]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        _REGISTRY[name] = cls
        return cls

    return wrap


def method_names() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)


def method_class(name: str) -> type[PromptMethod]:
    """The module class registered under ``name``; KeyError lists the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; valid: {', '.join(method_names())}") from None


def config_classes() -> tuple[type[MethodConfig], ...]:
    """The Config models of all registered methods (the members of the spec's method union)."""
    return tuple(_REGISTRY[n].Config for n in method_names())


def build_method(config: MethodConfig, clip: Any, classnames: list[str]) -> PromptMethod:
    """Instantiate the method that ``config.name`` names on a frozen prompted CLIP."""
    return method_class(config.name)(clip, classnames, config)


# Importing the modules registers them.
from mlgate.methods import adapt, adaptive_bimaple, bimaple, cocoop, coop, maple  # noqa: E402,F401

__all__ = [
    "GateConfig",
    "MethodConfig",
    "PromptMethod",
    "build_method",
    "config_classes",
    "method_class",
    "method_names",
    "register",
]
