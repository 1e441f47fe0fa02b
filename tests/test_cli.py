"""The command line as a user meets it: a mistake is one clear line and exit status 2, a bug keeps its traceback.

Each mistake is caught before any Ray starts, so the answer comes in seconds. The cases run the console
script's ``main`` in this process (argv as a user types it, stderr and the exit status as a shell sees them);
one runs ``python -m posterfusion`` as a real process, end to end.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from posterfusion.errors import UserValueError
from posterfusion.jobs import cli, cli_options

from support import cli_main


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = os.environ | {"RAY_ADDRESS": ""}  # none needed: every case fails before Ray would start
    return subprocess.run([sys.executable, "-m", "posterfusion", *args], capture_output=True, text=True, env=env,
                          timeout=120, cwd=cwd)


@pytest.fixture(scope="module")
def not_a_catalogue(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "data").mkdir()
    return root


@pytest.fixture(scope="module")
def a_catalogue_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-catalogue")
    (root / "data").mkdir()
    (root / "data" / "part-0.parquet").write_bytes(b"")  # only its name is looked at before Ray starts
    return root


@pytest.mark.parametrize("args, says", [
    (["score", "--model", "/nonexistent/bundle", "--catalogue", "/nonexistent", "--out", "/tmp/never"],
     "/nonexistent/bundle is not a model bundle: missing config.json"),
    (["serve", "--model", "/nonexistent/bundle"], "is not a model bundle"),
    (["evaluate", "--model", "/nonexistent/bundle", "--catalogue", "/nonexistent", "--out", "/tmp/never"],
     "is not a model bundle"),
    (["features", "--catalogue", "{empty}", "--out", "/tmp/never"], "no catalogue Parquet files under"),
    (["train", "--catalogue", "{catalogue}", "--out", "/tmp/never", "--variant", "fused"],
     "variant 'fused' reads object features: pass --features"),
    (["train", "--catalogue", "{catalogue}", "--out", "/tmp/never", "--variant", "cnn", "--set", "optim.epochs=0"],
     "optim.epochs: Input should be greater than or equal to 1"),
    (["train", "--catalogue", "{catalogue}", "--out", "/tmp/never", "--set", "optim.epocs=3"],
     "unknown setting 'optim.epocs'; did you mean optim.epochs"),
    (["train", "--catalogue", "{catalogue}", "--out", "/tmp/never", "--recipe", "best"], "unknown recipe 'best'"),
    (["serve", "--model", "{bundle}", "--max-batch-size", "0"], "max_batch_size"),
])
def test_a_user_error_is_one_line_on_stderr_and_exit_status_2(args, says, not_a_catalogue, a_catalogue_folder,
                                                             monkeypatch, capsys):
    args = [a.format(empty=not_a_catalogue, catalogue=a_catalogue_folder, bundle="/nonexistent") for a in args]
    status, out, err = cli_main(args, monkeypatch, capsys)
    assert status == 2, err
    assert "Traceback" not in err + out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("posterfusion: error:") and says in lines[0], err


def test_python_dash_m_posterfusion_is_the_same_command_in_its_own_process():
    run = _run("score", "--model", "/nonexistent/bundle", "--catalogue", "/nonexistent", "--out", "/tmp/never")
    assert run.returncode == 2 and "Traceback" not in run.stderr + run.stdout, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("posterfusion: error: /nonexistent/bundle is not a model bundle")


def test_a_user_error_raised_inside_a_ray_task_is_found_behind_rays_wrappers():
    class TaskError(Exception):  # the shape of ray.exceptions.RayTaskError: the original in .cause
        def __init__(self, cause):
            super().__init__("task failed")
            self.cause = cause

    original = UserValueError("3 posters have no cached object features")
    try:
        try:
            raise TaskError(original)
        except TaskError as wrapped:
            raise RuntimeError("dataset execution failed") from wrapped
    except RuntimeError as outer:
        assert cli.user_error_in(outer) is original
    assert cli.user_error_in(ValueError("a bug")) is None


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken():
        raise KeyError("a bug, not the user's mistake")

    monkeypatch.setattr(cli, "app", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli.main()


def test_both_stop_signals_stop_the_service_as_ctrl_c_does():
    """``posterfusion serve`` waits in a sleep; SIGINT and SIGTERM both end it through KeyboardInterrupt (its clean
    shutdown path; the network audit test sends SIGINT to a real service and times the stop)."""
    import signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        cli_options.stop_on_signals()
        for stop in saved:
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(stop)
    finally:
        for stop, handler in saved.items():
            signal.signal(stop, handler)
