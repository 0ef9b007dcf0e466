"""Ctrl-C and SIGTERM as ``KeyboardInterrupt``, held back out of sections that must not be cut.

Python raises ``KeyboardInterrupt`` at whatever bytecode the main thread is running. Inside a
multiprocessing queue's ``get`` or ``put`` that can leave the queue's lock held or a message half
read, and the flush that closes the interrupted trial would then wait forever on the metric sender.
Such sections run under :func:`deferred`: a signal arriving there is raised as soon as they end.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

_depth = 0  # nesting of deferred sections in the main thread (the only one signals interrupt)
_pending = False


def _handler(signum: int, frame: object) -> None:
    global _pending
    if _depth:
        _pending = True
        return
    raise KeyboardInterrupt


def install() -> None:
    """SIGINT and SIGTERM raise ``KeyboardInterrupt`` (SIGTERM ends a run as Ctrl-C does), except
    inside :func:`deferred` sections. Only from the main thread, where Python runs signal handlers."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _handler)
        signal.signal(signal.SIGTERM, _handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A section no interrupt cuts: one that arrives meanwhile is raised when the section ends.
    Keep sections short (a bounded queue operation), or Ctrl-C waits for them."""
    global _depth, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _pending:
            _pending = False
            raise KeyboardInterrupt
