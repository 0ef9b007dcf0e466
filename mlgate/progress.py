"""Progress for people at a terminal: a bar over the study's trials and one over the running trial's
steps, with its objective and verdict. Quiet and line-based when stderr is not a TTY (CI, logs)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from mlgate import pipes


class Progress:
    """Receives the study's messages and the running trial's metrics (through :class:`ProgressSink`)."""

    def __init__(self, n_trials: int, prefix: str = "", live: bool | None = None) -> None:
        self.prefix = prefix
        self.live = sys.stderr.isatty() if live is None else live
        self._bar = None
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bars, TextColumn, TimeElapsedColumn

            self._bar = Bars(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                             console=Console(stderr=True), transient=False)
            self._trials = self._bar.add_task(f"{prefix}trials", total=n_trials, status="")
            self._steps = None
            self._bar.start()

    def echo(self, line: str) -> None:
        if self._bar is not None:
            self._bar.console.print(self.prefix + line, highlight=False)
        else:
            pipes.write(self.prefix + line + "\n", sys.stderr)  # a log reader that left does not stop the study

    def set_finished(self, finished: int) -> None:
        if self._bar is not None:
            self._bar.update(self._trials, completed=finished)

    def trial(self, number: int, total_steps: int) -> None:
        if self._bar is not None:
            if self._steps is not None:
                self._bar.remove_task(self._steps)
            self._steps = self._bar.add_task(f"{self.prefix}trial {number}", total=total_steps, status="")

    def steps(self, number: int, step: int, status: str, evaluated: bool) -> None:
        if self._bar is not None and self._steps is not None:
            self._bar.update(self._steps, completed=step, status=status)
        elif evaluated:  # line mode: one line per evaluation
            self.echo(f"trial {number}: step {step}  {status}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


class ProgressSink:
    """A trial's metric sink that also moves the progress bar (objective and verdict so far)."""

    def __init__(self, inner, progress: Progress, number: int, objective: str, verdict) -> None:
        self.inner, self.progress, self.number = inner, progress, number
        self.objective, self.verdict = objective, verdict

    def log_metrics(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        self.inner.log_metrics(rows)
        if rows and rows[-1][0] > 0:
            step, metrics = rows[-1]
            value = self.inner.history.final.get(self.objective)
            status = (f"{self.objective}={value:.4g} " if value is not None else "") + f"verdict={self.verdict()}"
            self.progress.steps(self.number, step, status, self.objective in metrics)

    def log_artifacts(self, local_dir: Path) -> None:
        self.inner.log_artifacts(local_dir)

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        self.inner.log_image(key, image, step)
