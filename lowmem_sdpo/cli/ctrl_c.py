"""Ctrl-C on the command line: one line, "interrupted", and exit code 130, whenever it lands.

Two ways a Ctrl-C used to end otherwise, both seen when it lands inside the imports of torch / transformers:
  - the KeyboardInterrupt is raised inside an extension module's initialisation and comes out as another
    error (an ImportError, say, or "cannot load module more than once" when the import is tried again), so
    it printed a traceback and exit 1. `noticing_ctrl_c` records that a Ctrl-C arrived, and main() reports
    whatever exception follows it as the interruption it is.
  - after a KeyboardInterrupt that left code run through PyRun_String (pybind11's py::exec inside an
    extension's import does that), CPython keeps its "unhandled KeyboardInterrupt" mark set, and the process
    printed our line and then died by SIGINT (-2 to its parent, not 130): 16 of 120 Ctrl-Cs timed into the
    imports did so on a 2-core host; of 40 whose mark was read, the 5 that died had it set and the 35 that
    exited 130 did not. `exit_interrupted` leaves without finalising the interpreter, and none of 180 died so.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

INTERRUPTED = 130  # the shells' code for a process ended by Ctrl-C (128 + SIGINT)


class CtrlC:
    """Whether a Ctrl-C reached this process while `noticing_ctrl_c` was installed."""

    def __init__(self) -> None:
        self.seen = False


@contextmanager
def noticing_ctrl_c() -> Iterator[CtrlC]:
    """SIGINT raises KeyboardInterrupt as Python's default handler does, and is remembered. Handlers set
    inside (the training loop's checkpoint-then-stop) take over while they are installed. Off the main
    thread, where Python allows no handler, nothing is installed and nothing is remembered."""
    seen = CtrlC()
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def handler(_signum: int, _frame: Any) -> None:
        seen.seen = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)


def exit_interrupted() -> NoReturn:
    """End the command-line process with 130 after a Ctrl-C we handled, without the interpreter's teardown
    (see the module docstring). The atexit handlers, logging's flush among them, still run."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(INTERRUPTED)
