"""Nested settings as dotted keys: ``--set train.steps=20``, Optuna's param names, MLflow's params."""

from __future__ import annotations

import json
from typing import Any

import yaml

from mlgate.errors import SpecError


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    # extra written over base, section by section.
    out = dict(base)
    for key, value in extra.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = deep_merge(out[key], value) if nested else value
    return out


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts → {"a.b.c": value}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def canonical(value: Any) -> str:
    # One string form per value, so a resumed trial never re-logs a param as '7' vs '7.0'.
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return "null" if value is None else str(value)


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Write ``value`` at dotted ``key`` in nested dicts, creating sections as needed."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_assignment(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` → (key, YAML-parsed value); ``train.steps=20`` gives 20, ``x=null`` gives None."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. train.steps=20")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value
