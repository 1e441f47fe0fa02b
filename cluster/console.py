"""What a person sees on the console: the project's own lines, Ray's internals only when asked.

Without ``--verbose``:

* Python loggers of Ray, Ray Data, Ray Train and Ray Serve (driver side) log errors only, every
  Ray worker's Python logging is set to warnings (``ray.init(logging_config=…)``) and Ray Data's
  console handler to warnings (``ray_data_logging.yaml``), so "Starting execution of Dataset …",
  "Reporting training result …" and the like stay in Ray's own log files
  (``/tmp/ray/session_latest/logs``);
* Ray Data draws progress bars only on a terminal, never into a pipe or a CI log;
* one known, harmless error line of Ray's C++ core is dropped from the console: Ray Data passes
  object references to every actor it creates, which Ray 2.60 reports at ERROR level as
  "Actor … has constructor arguments in the object store and max_restarts > 0" (Ray issues
  #53727, #57733). It reads like a failure and is not one; Ray's log files keep it. Anything
  else the C++ core prints reaches the console unchanged.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

KNOWN_NOISE = [
    re.compile(rb"core_worker\.cc:\d+: Actor with class name: '[^']*' and ID: '[0-9a-f]+' has constructor "
               rb"arguments in the object store and max_restarts > 0"),
]
RAY_LOGGERS = ["ray", "ray.data", "ray.train", "ray.serve", "ray.tune"]


def worker_logging_level(verbose: bool) -> str:
    """The Python logging level of every Ray worker process (what ``ray.init`` is given)."""
    return "INFO" if verbose else "WARNING"


@contextmanager
def quiet_console(verbose: bool = False) -> Iterator[None]:
    """Route Ray's internal output to its log files for the duration (see the module docstring)."""
    progress = sys.stderr.isatty()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0" if progress else "1")
    if verbose:
        yield
        return
    # Ray Data configures its loggers in every process from this file (workers inherit the variable)
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(Path(__file__).with_name("ray_data_logging.yaml")))
    levels = {name: logging.getLogger(name).level for name in RAY_LOGGERS}
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with _filtered_stderr(KNOWN_NOISE):
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@contextmanager
def _filtered_stderr(patterns: list[re.Pattern]) -> Iterator[None]:
    """Replace file descriptor 2 with a pipe whose lines are copied to the real stderr, minus ``patterns``.

    At the descriptor level, because Ray's C++ core writes there directly (no Python logger).
    """
    try:
        sys.stderr.flush()
        real = os.dup(2)
    except (OSError, ValueError):  # no real stderr (an embedding host): nothing to filter
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    copier = threading.Thread(target=_copy_lines, args=(read_end, real, patterns), daemon=True,
                              name="stderr-filter")
    copier.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)  # closes the pipe's last write end: the copier drains and stops
        copier.join(timeout=5)
        os.close(real)


def _copy_lines(read_end: int, real: int, patterns: list[re.Pattern]) -> None:
    pending = b""
    with os.fdopen(read_end, "rb", buffering=0) as source:
        while chunk := source.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if not any(p.search(line) for p in patterns):
                    os.write(real, line + b"\n")
        if pending and not any(p.search(pending) for p in patterns):
            os.write(real, pending)
