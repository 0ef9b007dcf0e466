"""Errors that reach the user as one readable paragraph and a non-zero exit, never a traceback."""

from __future__ import annotations


class MlgateError(Exception):
    """Bad input from the user (spec, flag, file, experiment). The CLI exits 2."""

    exit_code = 2

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.problems = problems or []

    def __str__(self) -> str:
        if not self.problems:
            return self.message
        return self.message + "\n" + "\n".join(f"  - {p}" for p in self.problems)


class SpecError(MlgateError):
    """A study spec (file or --set override) that does not validate."""


class StudyFailed(Exception):
    """The study could not finish (e.g. too many consecutive trial failures). The CLI exits 1."""

    exit_code = 1
