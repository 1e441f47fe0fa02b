"""The console a person reads: Ray's known harmless lines dropped, everything else kept."""

from __future__ import annotations

import subprocess
import sys
import textwrap

NOISE = [
    "[2026-12-01 21:00:00,000 E 1 1] core_worker.cc:123: Actor with class name: 'MapWorker(MapBatches(X))' and "
    "ID: 'abc123' has constructor arguments in the object store and max_restarts > 0",
    "/x/ray/data/_internal/execution/interfaces/execution_options.py:436: RayDeprecationWarning: "
    "`ExecutionOptions.exclude_resources` is deprecated and will be removed after January 2027.",
    "  self.exclude_resources = exclude_resources",
    "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
    "\x1b[36m(MapWorker pid=1)\x1b[0m INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
    "\x1b[33m(raylet)\x1b[0m WARNING: 8 PYTHON worker processes have been started on node: ab with address: x",
    "[2026-12-01 22:37:10,977 E 1410 1410] (gcs_server) gcs_actor_scheduler.cc:538: Failed to kill actor ad2cba20, "
    "status: Invalid: KillActor RPC failed for actor ad2cba20: RpcError: RPC error: Socket closed rpc_code: 14",
    "[2026-12-02 11:24:10,018 E 1565 1565] (gcs_server) gcs_actor_scheduler.cc:538: Failed to kill actor NIL_ID, "
    "return status: Invalid: KillActor RPC failed for actor NIL_ID: RpcError: RPC error: Socket closed rpc_code: 14",
    "[2026-12-02 11:20:43,762 E 919 939] core_worker.cc:4621: Mismatched ActorID: ignoring KillActor for previous "
    "actor e4895af0c40589a09ea5d19801000000, current actor ID: NIL_ID",
]
KEPT = [
    "[2026-12-01 21:00:00,000 E 1 1] core_worker.cc:99: a real failure",
    "ValueError: something our code raised",
    "/x/jobs/score.py:10: RayDeprecationWarning: `ray_remote_args` is deprecated",
]


def test_quiet_console_drops_only_the_known_noise_at_the_file_descriptor():
    """Written to fd 2 directly, as Ray's C++ core and forwarded worker logs are."""
    script = textwrap.dedent(f"""
        import os
        from posterfusion.cluster.console import quiet_console
        with quiet_console(verbose=False):
            for line in {NOISE + KEPT!r}:
                os.write(2, (line + "\\n").encode())
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines() == KEPT


DISK = ("[2026-12-04 19:4{}:45,388 E 25493 25504] (raylet) file_system_monitor.cc:116: /tmp/ray/session_x is over "
        "95% full, available space: 8.2 GB; capacity: 251.972 GB. Object creation will fail if spilling is required.")


def test_a_true_line_that_repeats_every_ten_seconds_is_shown_once():
    """The raylet repeats its disk-space warning every 10 s while the disk stays full: the first one is shown."""
    lines = [DISK.format(0), KEPT[0], DISK.format(1), KEPT[1], DISK.format(2)]
    script = textwrap.dedent(f"""
        import os
        from posterfusion.cluster.console import quiet_console
        with quiet_console(verbose=False):
            for line in {lines!r}:
                os.write(2, (line + "\\n").encode())
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.stderr.splitlines() == [DISK.format(0), KEPT[0], KEPT[1]]


def test_verbose_keeps_every_line():
    script = textwrap.dedent(f"""
        import os
        from posterfusion.cluster.console import quiet_console
        with quiet_console(verbose=True):
            for line in {NOISE!r}:
                os.write(2, (line + "\\n").encode())
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.stderr.splitlines() == NOISE


def test_progress_bars_are_drawn_on_a_terminal_and_never_into_a_pipe():
    import os
    import pty

    script = textwrap.dedent("""
        import os, sys
        os.environ.pop("RAY_DATA_DISABLE_PROGRESS_BARS", None)
        from posterfusion.cluster.console import quiet_console
        with quiet_console(verbose=True):
            print("bars disabled:", os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"], flush=True)
    """)
    env = {k: v for k, v in os.environ.items() if k != "RAY_DATA_DISABLE_PROGRESS_BARS"}
    piped = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert "bars disabled: 1" in piped.stdout, piped.stderr
    main, child = pty.openpty()
    on_terminal = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=child, text=True,
                                 timeout=60, env=env)
    os.close(child)
    os.close(main)
    assert "bars disabled: 0" in on_terminal.stdout
