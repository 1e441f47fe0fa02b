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
