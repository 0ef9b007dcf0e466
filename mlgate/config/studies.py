"""Where study specs are found: ``studies/`` of the working directory, then the ones mlgate ships."""

from __future__ import annotations

from pathlib import Path

from mlgate.errors import SpecError

_PACKAGE = Path(__file__).resolve().parent.parent
# An installed wheel carries the studies inside the package; a source checkout has them at its top.
STUDIES_DIR = _PACKAGE / "studies" if (_PACKAGE / "studies").is_dir() else _PACKAGE.parent / "studies"


def _study_dirs() -> list[Path]:
    # ./studies of the working directory first (a user's own), then the ones mlgate ships.
    return list(dict.fromkeys([Path.cwd() / "studies", STUDIES_DIR]))


def study_name(path: Path) -> str:
    """A shipped spec's name: its path under ``studies/`` without .yaml (``paper/gating_table1``)."""
    for folder in _study_dirs():
        if path.is_relative_to(folder):
            return path.relative_to(folder).with_suffix("").as_posix()
    return path.stem


def list_studies() -> list[Path]:
    """The spec files in ``studies/`` and its subfolders (one per name; the working directory's win)."""
    found: dict[str, Path] = {}
    for folder in _study_dirs():
        for path in sorted(folder.rglob("*.yaml")) if folder.is_dir() else []:
            found.setdefault(path.relative_to(folder).with_suffix("").as_posix(), path)
    return [found[name] for name in sorted(found)]


def resolve_study_path(study: str) -> Path:
    """A study name from ``studies/`` (without .yaml) or a path to a YAML file."""
    candidate = Path(study)
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        if not candidate.is_file():
            raise SpecError(f"{study}: no such spec file.")
        return candidate
    for folder in _study_dirs():
        path = folder / f"{study}.yaml"
        if path.is_file():
            return path
    names = ", ".join(study_name(p) for p in list_studies()) or "(none)"
    raise SpecError(f"{study}: no study of that name in studies/ and no such file. Known studies: {names}.")
