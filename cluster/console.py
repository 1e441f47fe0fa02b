"""What a person sees on the console: the project's own lines, Ray's internals only when asked.

Without ``--verbose``:

* Python loggers of Ray, Ray Data, Ray Train and Ray Serve (driver side) log errors only, every
  Ray worker's Python logging is set to warnings (``ray.init(logging_config=…)``) and Ray Data's
  console handler to warnings (``ray_data_logging.yaml``), so "Starting execution of Dataset …",
  "Reporting training result …" and the like stay in Ray's own log files
  (``/tmp/ray/session_latest/logs``);
* MLflow logs warnings only (``MLFLOW_LOGGING_LEVEL``; its INFO lines stay off the console);
* Ray Data draws progress bars only on a terminal, never into a pipe or a CI log;
* a few known, harmless lines that no logger controls are dropped from the console (Ray's log
  files keep them; anything else reaches the console unchanged):

  - Ray's C++ core: Ray Data passes object references to every actor it creates, which Ray
    2.60 reports at ERROR level as "Actor … has constructor arguments in the object store and
    max_restarts > 0" (Ray issues #53727, #57733). It reads like a failure and is not one;
  - Ray Train's controller builds Ray Data ``ExecutionOptions`` with the deprecated
    ``exclude_resources`` on every run (Ray's own call, not ours: ``DataConfig.
    default_ingest_options``); the warning and the source line Python prints under it;
  - TensorFlow Lite's C++ "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." at every
    detector load;
  - the GCS failing to kill an actor whose worker already exited as the job ends ("KillActor
    RPC failed … Socket closed"): a shutdown race, the actor is gone either way;
  - the raylet's hint that more worker processes started than CPUs: by design here, every
    stage asks fractional CPUs so that 2 cores never deadlock (docs/architecture.md).

* a line that is true but repeats is shown once per command: the raylet's warning that the disk
  holding its session directory is over its capacity threshold (95 %; object spilling would
  fail), which it repeats every 10 s for as long as the disk stays that full.
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
    re.compile(rb"execution_options\.py:\d+: RayDeprecationWarning: `ExecutionOptions\.exclude_resources` is "
               rb"deprecated"),
    re.compile(rb"^\s*self\.exclude_resources = exclude_resources\s*$"),
    re.compile(rb"INFO: Created TensorFlow Lite XNNPACK delegate for CPU\."),
    re.compile(rb"\(raylet\).*WARNING: \d+ PYTHON worker processes have been started on node"),
    # a kill sent to an actor that has already exited (seen as the demo's stages end): nothing is lost
    re.compile(rb"core_worker\.cc:\d+: Mismatched ActorID: ignoring KillActor for previous actor [0-9a-f]+, "
               rb"current actor ID: NIL_ID"),
    re.compile(rb"\(gcs_server\) gcs_actor_scheduler\.cc:\d+: Failed to kill actor \w+.*KillActor RPC failed "
               rb"for actor \w+: RpcError: RPC error: Socket closed"),
]
SHOWN_ONCE = [
    re.compile(rb"\(raylet\) file_system_monitor\.cc:\d+: .* is over \d+% full, available space"),
]
# "ray" itself is reset by ``ray.init(logging_level=…)``; its children keep a level set here.
# The authentication logger says, at every local start, that Ray chose token auth (as we want).
QUIET_RAY_DATA = Path(__file__).with_name("ray_data_logging.yaml")
RAY_LOGGERS = ["ray", "ray.data", "ray.train", "ray.serve", "ray.tune",
               "ray._private.authentication.authentication_token_setup"]


def is_verbose() -> bool:
    """Whether this command runs with ``--verbose`` (the CLI sets it for every process it starts)."""
    return os.environ.get("POSTERFUSION_VERBOSE") == "1"


def train_logging_level() -> str:
    """Ray Train's own ``ray.train`` logs ("Checkpoint successfully created …"): warnings unless verbose."""
    return "INFO" if is_verbose() else "WARNING"


def quiet_ray_data_env() -> dict[str, str]:
    """The variable that points Ray Data's logging at ``ray_data_logging.yaml`` (errors only on the console).

    Ray Data configures its loggers in every process from this file, so it must be in the
    environment of the processes a local Ray starts (:func:`~posterfusion.cluster.local.
    prepare_environment` sets it) and of the driver before ``ray.data`` is imported. Nothing
    when verbose, or when the user already points it elsewhere.
    """
    if is_verbose() or "RAY_DATA_LOGGING_CONFIG" in os.environ:
        return {}
    return {"RAY_DATA_LOGGING_CONFIG": str(QUIET_RAY_DATA)}


def worker_logging_level(verbose: bool) -> str:
    """The Python logging level of every Ray worker process (what ``ray.init`` is given)."""
    return "INFO" if verbose else "WARNING"


@contextmanager
def quiet_console(verbose: bool = False) -> Iterator[None]:
    """Route Ray's internal output to its log files for the duration (see the module docstring)."""
    progress = sys.stderr.isatty()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0" if progress else "1")
    if verbose:
        if os.environ.get("RAY_DATA_LOGGING_CONFIG") == str(QUIET_RAY_DATA):  # set before the flag was read
            del os.environ["RAY_DATA_LOGGING_CONFIG"]
        yield
        return
    os.environ.update(quiet_ray_data_env())
    # MLflow (imported later, by the jobs that track) sets its own level from this: warnings, not its INFO lines
    # such as "Creating initial MLflow database tables" on a fresh local store
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    levels = {name: logging.getLogger(name).level for name in RAY_LOGGERS}
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with _filtered_stderr(KNOWN_NOISE, SHOWN_ONCE):
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@contextmanager
def _filtered_stderr(patterns: list[re.Pattern], once: list[re.Pattern]) -> Iterator[None]:
    """Replace file descriptor 2 with a pipe whose lines are copied to the real stderr, minus ``patterns``
    and minus every repeat of a line matching one of ``once``.

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
    copier = threading.Thread(target=_copy_lines, args=(read_end, real, patterns, once), daemon=True,
                              name="stderr-filter")
    copier.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)  # closes the pipe's last write end: the copier drains and stops
        copier.join(timeout=5)
        os.close(real)


def _copy_lines(read_end: int, real: int, patterns: list[re.Pattern], once: list[re.Pattern]) -> None:
    pending, shown_before = b"", set()

    def shown(line: bytes) -> bool:
        if any(p.search(line) for p in patterns):
            return False
        repeats = {p.pattern for p in once if p.search(line)}
        first = not repeats & shown_before
        shown_before.update(repeats)
        return first

    with os.fdopen(read_end, "rb", buffering=0) as source:
        while chunk := source.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if shown(line):
                    os.write(real, line + b"\n")
        if pending and shown(pending):
            os.write(real, pending)
