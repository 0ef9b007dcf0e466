"""Timing configurations against each other in one run: warm-up, round-robin passes, paired ratios."""

from __future__ import annotations

import statistics
import threading
import time
from typing import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HostPeak:
    """The largest growth of this process's resident memory while in the ``with`` block (sampled every
    few milliseconds): on the CPU, an upper bound of what a step allocates beyond the model and data
    already resident (freed memory the allocator keeps is reused first; measure one configuration per
    process for a clean figure)."""

    def __init__(self, interval_s: float = 0.002) -> None:
        import psutil

        self.process, self.interval_s, self.peak_mb = psutil.Process(), interval_s, 0.0
        self._stop = threading.Event()

    def _poll(self, base: int) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, (self.process.memory_info().rss - base) / 2**20)
            time.sleep(self.interval_s)

    def __enter__(self) -> HostPeak:
        self._thread = threading.Thread(target=self._poll, args=(self.process.memory_info().rss,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(steps_by_config: dict[str, Callable[[int], None]], steps: int, warmup: int, rounds: int,
            device: torch.device, settle: dict[str, Callable[[], None]] | None = None,
            ) -> dict[str, tuple[float, float, float, list[float]]]:
    """(steps per second, peak GPU MB, peak host growth MB, seconds of each pass) per configuration:
    each warmed up (host memory is sampled then, so the sampler stays out of the timed passes), then
    timed in ``rounds`` round-robin passes of ``steps`` steps (so drifts in machine load hit every
    configuration alike), steps per second from the median pass. ``settle[name]`` runs after that
    configuration's warm-up and each of its passes, untimed (the metric sender drains, so its work
    does not land in the next configuration's time; :func:`bench` reports that work separately, as
    the sender's CPU time)."""
    settle = settle or {}
    host = dict.fromkeys(steps_by_config, 0.0)
    for name, step in steps_by_config.items():
        with HostPeak() as peak:
            for i in range(warmup):
                step(i + 1)
        host[name] = peak.peak_mb
        if name in settle:
            settle[name]()
    times: dict[str, list[float]] = {name: [] for name in steps_by_config}
    peaks = dict.fromkeys(steps_by_config, 0.0)
    counter = warmup
    for _ in range(rounds):
        for name, step in steps_by_config.items():
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            for i in range(steps):
                step(counter + i + 1)
            _sync(device)
            times[name].append(time.perf_counter() - start)
            if name in settle:
                settle[name]()
            if device.type == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device) / 2**20)
        counter += steps
    return {name: (steps / statistics.median(t), peaks[name], host[name], t) for name, t in times.items()}


def paired_ratio(slower: list[float], faster: list[float]) -> float:
    """The median, over rounds, of one configuration's pass time over another's in the same round.
    The passes of a round run back to back, so a drift in the machine's load that spans rounds
    (common on a shared machine) cancels, where a ratio of the two medians would keep it."""
    return statistics.median(a / b for a, b in zip(slower, faster))
