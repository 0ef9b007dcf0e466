"""Ctrl-C and SIGTERM as ``KeyboardInterrupt``, held back out of sections that must not be cut.

Python raises ``KeyboardInterrupt`` at whatever bytecode the main thread is running. Inside a
multiprocessing queue's ``get`` or ``put`` that can leave the queue's lock held or a message half
read, and the flush that closes the interrupted trial would then wait forever on the metric sender.
Such sections run under :func:`deferred`: a signal arriving there is raised as soon as they end.
And where the main thread is running a ``__del__`` or a weakref callback (garbage collection, at any
bytecode), Python prints the ``KeyboardInterrupt`` and drops it: :func:`check`, called between
training steps, raises such a swallowed interrupt again.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator

_depth = 0  # nesting of deferred sections in the main thread (the only one signals interrupt)
_pending = False
_swallowed = False  # an interrupt Python dropped (raised inside a finalizer), for check() to raise
_previous_unraisable_hook = sys.unraisablehook


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
        sys.unraisablehook = _unraisable


def check() -> None:
    """Raise the ``KeyboardInterrupt`` of a signal that Python swallowed (it landed while a finalizer
    ran). Call where an interrupt may safely land: between training steps."""
    global _swallowed
    if _swallowed:
        _swallowed = False
        raise KeyboardInterrupt


def _unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    # Python's report of an exception it could not raise; an interrupt is kept for check() instead.
    global _swallowed
    if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
        _swallowed = True
        return
    _previous_unraisable_hook(unraisable)


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
