"""What the ``posterfusion`` commands share: option types, the checks before Ray starts, the cluster.

Kept apart from :mod:`posterfusion.jobs.cli` so the command module holds only the commands. Like
it, this imports no job at its top: ``--help`` answers at once.
"""

from __future__ import annotations

from typing import Annotated

import typer

Address = Annotated[str | None, typer.Option(help="Ray address (default: RAY_ADDRESS, else a local Ray).")]
NumCpus = Annotated[float | None, typer.Option(help="CPUs for a local Ray (default: all).")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show Ray's own logs too.")]
DetectorWeights = Annotated[str | None, typer.Option(help="Detector weights: .safetensors, .tflite, or a .pt "
                                                            "beside its .safetensors twin.")]
Sets = Annotated[list[str] | None, typer.Option("--set", help="Any training setting: SECTION.NAME=VALUE, repeatable "
                                                        "(`posterfusion recipes --show quality` lists them).")]
FromScratch = Annotated[bool, typer.Option(help="Train without the recipe's pretrained weights (its scratch settings "
                                                "apply); without it, missing weights are an error.")]


def given(**options) -> dict:
    """The options a user set: an unset one (None) falls through to its config's own default."""
    return {k: v for k, v in options.items() if v is not None}


def check(model: str | None = None, catalogue: str | None = None, stores: list[str | None] = ()) -> None:
    """Refuse, before any Ray starts (seconds, not a minute), a bundle or a catalogue that is not one, and an
    output or input on a store that cannot be used (unknown scheme, missing bucket, wrong credentials)."""
    from posterfusion.locations import Location

    for where in stores:
        if where is not None:
            Location(where).check_store()
    if model is not None:
        from posterfusion.models.bundle import load_bundle

        load_bundle(model)
    if catalogue is not None:
        from posterfusion.features.catalogue import catalogue_files

        catalogue_files(catalogue)


def cluster(address: str | None, num_cpus: float | None = None):
    """The command's Ray: ``--address``/``RAY_ADDRESS``, else a loopback-only local start."""
    from posterfusion.cluster import ClusterConfig, ray_cluster

    return ray_cluster(ClusterConfig(address=address, num_cpus=num_cpus))


def _interrupted(signum, frame) -> None:
    """SIGTERM or SIGINT: a clean stop. Ray's own SIGTERM handler aborts with a stack dump, and a SIGINT sent
    to the process (``kill -INT``) did not stop it (measured: still serving after 18 s)."""
    raise KeyboardInterrupt


def stop_on_signals() -> None:
    """Both stop signals end ``posterfusion serve`` the way Ctrl-C at its terminal does."""
    import signal

    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, _interrupted)


def present_local_token(address: str | None) -> None:
    """Attach to a loopback Ray with the token posterfusion keeps under its Ray HOME (``cluster/local.py``).

    ``posterfusion serve``'s local Ray asks every driver for that token; a second process on this
    machine (``deploy``) presents it unless its environment names one. Set before Ray is imported:
    Ray reads these once.
    """
    import os

    from posterfusion.cluster.local import state_dir

    token = state_dir() / "ray-home" / ".ray" / "auth_token"
    host = (address or os.environ.get("RAY_ADDRESS", "")).split("://")[-1].rsplit(":", 1)[0]
    named = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if (host.startswith("127.") or host == "localhost") and token.is_file() and not named:
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
