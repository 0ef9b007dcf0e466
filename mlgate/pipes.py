"""Output to a reader that may leave early (``mlgate list | head -1``): a closed pipe is not an error.

A command whose reader has gone stops quietly with exit code 141 (128 + SIGPIPE, what a shell reports
for any program whose reader left first); a study whose log reader has gone runs on, silently.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, TextIO

READER_LEFT = 141


def silence(stream: TextIO) -> None:
    """Point the stream's file descriptor at /dev/null, so later writes and the flush at exit go nowhere."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # not backed by a file descriptor (captured output): nothing to redirect
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def write(text: str, stream: TextIO | None = None) -> bool:
    """Write and flush ``text`` (to stdout by default); False, and the stream silenced, when its reader has gone."""
    stream = stream or sys.stdout
    try:
        stream.write(text)
        stream.flush()
        return True
    except BrokenPipeError:
        silence(stream)
        return False


def quiet_when_reader_leaves(main: Callable[..., int]) -> Callable[..., int]:
    """A command's entry point that ends with exit code 141 and no traceback once its reader has gone."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            try:
                return main(*args, **kwargs)
            finally:
                sys.stdout.flush()  # output that fit the pipe's buffer meets the closed pipe here
        except BrokenPipeError:
            silence(sys.stdout)
            silence(sys.stderr)
            return READER_LEFT

    return wrapped
