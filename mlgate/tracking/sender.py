"""Metric batches sent to MLflow from a separate process.

A ``log_batch`` of a thousand metrics costs MLflow's SQL store about 0.1 s of Python. From a thread it
holds the GIL against the training loop, whose many small tensor ops each wait to take it back (on a
GPU, the device then idles); from this process it costs the loop nothing but the queue put. The sender
gathers rows for a couple of seconds into one ``log_batch`` per run, keeps what it cannot deliver while
the tracking server is down and retries with backoff; a trial's run is closed only after
:meth:`MetricSender.flush` says everything landed (a flush sends at once).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from typing import Any

from mlgate import interrupts, pipes

Row = tuple[str, float, int, int]  # key, value, timestamp (ms), step

# Seconds between sends while no flush waits: each log_batch has a fixed cost besides its rows, and where
# no core is spare the sender's CPU is the training's, so rows gather into fewer, larger batches.
SEND_INTERVAL_S = 2.0
OWNER_CHECK_S = 1.0

_CONNECTION_MARKERS = ("Connection", "Max retries exceeded", "Failed to establish", "timed out",
                       "Temporary failure", "API request to", "refused")


def is_connection_error(exc: BaseException) -> bool:
    """Whether an MLflow call failed because the tracking server could not be reached."""
    # MLflow wraps requests' connection errors in MlflowException; OSError covers the rest of the stack.
    text = f"{type(exc).__name__}: {exc}"
    return isinstance(exc, (ConnectionError, TimeoutError)) or any(m in text for m in _CONNECTION_MARKERS)


def _owner_alive(pid: int) -> bool:
    import psutil

    try:  # a killed process stays a zombie until its parent reaps it: that counts as gone
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _serve(uri: str, env: dict[str, str], requests: Any, replies: Any, outage_s: float, owner: int) -> None:
    """The sender process: ``("log", run_id, rows)``, ``("flush", run_id, token)``, ``("stop",)``.
    Serves the process ``owner`` until it says stop, or until it is gone (killed): then it sends
    what it was given and ends."""
    os.environ.clear()
    os.environ.update(env)  # the parent's environment now (a forkserver child would have the server's)
    # Ctrl-C, and the SIGTERM of `timeout`, Slurm or a container stop, reach the whole process group:
    # the trainer closes its runs and then stops this process, which must still be there for their
    # last rows.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        # Training comes first where cores are few; metrics catch up in the gaps. (Not SCHED_IDLE: it
        # starves the sender, and the flush that waits on it, while another worker keeps the cores busy.)
        os.nice(19)
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    pending: dict[str, list[Row]] = {}
    failed: dict[str, str] = {}
    down_since: float | None = None
    waiting: list[tuple[str, int]] = []  # flushes answered once their run's rows have landed

    def send_all() -> bool:
        # Everything pending, run by run; False while the server cannot be reached.
        nonlocal down_since
        for run_id in list(pending):
            rows = pending[run_id]
            try:
                client.log_batch(run_id, metrics=[Metric(*row) for row in rows])
            except (MlflowException, OSError) as exc:
                if not is_connection_error(exc):
                    failed[run_id] = f"{type(exc).__name__}: {exc}"
                    del pending[run_id]
                    continue
                if down_since is None:
                    pipes.write("mlgate: MLflow tracking unreachable; buffering metrics and retrying\n", sys.stderr)
                    down_since = time.time()
                if time.time() - down_since > outage_s:
                    for run in pending:
                        failed[run] = f"MLflow tracking unreachable for over {outage_s:.0f}s: {exc}"
                    pending.clear()
                return False
            del pending[run_id]
        if down_since is not None:
            pipes.write(f"mlgate: MLflow tracking reachable again after {time.time() - down_since:.0f}s; "
                        "buffered metrics sent\n", sys.stderr)
            down_since = None
        return True

    last_send, gap, backoff = -math.inf, 0.0, 0.25
    while True:
        # Wake at least every second to see whether the owner is still there.
        due = max(0.0, last_send + gap - time.monotonic()) if pending else math.inf
        try:
            request = requests.get(timeout=min(due, OWNER_CHECK_S))
        except queue.Empty:
            request = None
            if not _owner_alive(owner):
                send_all()
                return
        if request is not None:
            kind = request[0]
            if kind == "stop":
                send_all()
                return
            if kind == "log":
                pending.setdefault(request[1], []).extend(request[2])
                if not requests.empty():
                    continue  # take everything queued into one batch per run
            elif kind == "flush":
                waiting.append((request[1], request[2]))
        if not waiting and time.monotonic() < last_send + gap:
            continue  # rows gather until the next send is due (a flush sends at once)
        delivered = send_all()
        last_send = time.monotonic()
        backoff = 0.25 if delivered else min(backoff * 2, 10.0)
        gap = SEND_INTERVAL_S if delivered else backoff
        for run_id, token in list(waiting):
            if run_id not in pending:
                replies.put((token, failed.pop(run_id, None)))
                waiting.remove((run_id, token))
        for run_id in [r for r in failed if all(w[0] != r for w in waiting)]:
            replies.put((None, run_id, failed[run_id]))  # an unsolicited failure, seen at the next log
            del failed[run_id]


class MetricSender:
    """The sender process for one tracking URI; :meth:`close` it when done (its runs flushed)."""

    def __init__(self, uri: str, outage_s: float = 600.0) -> None:
        # forkserver: children forked from a clean process with MLflow already imported (not from this
        # one, with its threads and CUDA context), so a sender starts in milliseconds after the first.
        if "forkserver" in mp.get_all_start_methods():
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["mlgate.tracking.sender", "mlflow.tracking", "mlflow.entities"])
        else:
            ctx = mp.get_context("spawn")
        self._requests, self._replies = ctx.Queue(), ctx.Queue()
        self._process = ctx.Process(target=_serve, name="mlgate-metrics", daemon=True,
                                    args=(uri, dict(os.environ), self._requests, self._replies, outage_s, os.getpid()))
        self._process.start()
        self._tokens = itertools.count()
        self._answers: dict[int, str | None] = {}
        self._failures: dict[str, str] = {}
        self._lock = threading.Lock()  # trials of one process may log from several threads

    def log(self, run_id: str, rows: list[Row]) -> None:
        """Queue rows for ``run_id``; raises if an earlier send for that run failed for good."""
        with self._lock:
            self._collect(block=False)
            error = self._failures.pop(run_id, None)
        if error:
            raise RuntimeError(error)
        with interrupts.deferred():  # an interrupt cut into a queue operation would hang the closing flush
            self._requests.put(("log", run_id, rows))

    def flush(self, run_id: str) -> None:
        """Block until every row queued for ``run_id`` has landed; raises what made that impossible."""
        with self._lock:
            token = next(self._tokens)
            with interrupts.deferred():
                self._requests.put(("flush", run_id, token))
            while token not in self._answers:
                if not self._collect(block=True):
                    raise RuntimeError("the mlgate metric sender process died; this run's metrics may be incomplete")
            error = self._answers.pop(token) or self._failures.pop(run_id, None)
        if error:
            raise RuntimeError(error)

    def _collect(self, block: bool) -> bool:
        # Read the replies there are (blocking: at least one); False when blocking found the process dead.
        while True:
            try:
                with interrupts.deferred():  # at most a second; a reply taken is kept before it ends
                    reply = self._replies.get(timeout=1.0) if block else self._replies.get_nowait()
                    if reply[0] is None:
                        self._failures[reply[1]] = reply[2]
                    else:
                        self._answers[reply[0]] = reply[1]
            except queue.Empty:
                if not block:
                    return True
                if not self._process.is_alive():
                    return False
                continue
            if block:
                return True

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the sender process has used so far: on a machine with no core
        to spare, the least that logging costs the training."""
        import psutil

        times = psutil.Process(self._process.pid).cpu_times()
        return times.user + times.system

    def close(self) -> None:
        """Send what is queued and stop the process."""
        if self._process.is_alive():
            with interrupts.deferred():
                self._requests.put(("stop",))
            self._process.join(timeout=60)
        if self._process.is_alive():
            self._process.terminate()
