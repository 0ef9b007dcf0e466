"""The method registry (in the spirit of timm's ``_registry``): method modules import it, never the
package ``__init__``, so nothing imports in a circle.

``@register("coop")`` on a :class:`~mlgate.methods.base.PromptMethod` subclass registers it under the
name its config class (:data:`mlgate.config.methods.METHOD_CONFIGS`) declares; :func:`build_method`
imports the config's ``module`` the first time the method is built.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable

from mlgate.config.methods import METHOD_CONFIGS, MethodConfig, method_config_class, method_names
from mlgate.errors import SpecError

if TYPE_CHECKING:
    from mlgate.methods.base import PromptMethod

_REGISTRY: dict[str, type[PromptMethod]] = {}


def register(name: str) -> Callable[[type[PromptMethod]], type[PromptMethod]]:
    """Class decorator: register a method under ``name`` (a key of ``METHOD_CONFIGS``)."""

    def wrap(cls: type[PromptMethod]) -> type[PromptMethod]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        if METHOD_CONFIGS.get(name) is not cls.Config:
            raise ValueError(f"method {name!r}: its Config is not METHOD_CONFIGS[{name!r}]")
        _REGISTRY[name] = cls
        return cls

    return wrap


def method_class(name: str) -> type[PromptMethod]:
    """The module class of method ``name`` (importing its module); KeyError lists the valid names."""
    config = method_config_class(name)
    if name not in _REGISTRY:
        importlib.import_module(config.module)
    return _REGISTRY[name]


def build_method(config: MethodConfig, clip: Any, classnames: list[str]) -> PromptMethod:
    """Instantiate the method that ``config.name`` names on a frozen prompted CLIP. Settings it cannot be
    built with (a ctx_init longer than n_ctx, a depth beyond the backbone's layers) raise :class:`SpecError`."""
    try:
        return method_class(config.name)(clip, classnames, config)
    except ValueError as exc:
        raise SpecError(f"method: {exc}.") from None


__all__ = ["build_method", "method_class", "method_names", "register"]
