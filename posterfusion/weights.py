"""Where pretrained weights files are found: the one lookup for backbones and detectors alike.

A weights file is named by a path, by a URI (``s3://bucket/weights/yolov8n_int8.tflite``: fetched
once into the local cache under ``$POSTERFUSION_HOME``, keyed by the URI — weights files are
immutable, one name per version — then used as a file), or by a bare file name looked up in
``$POSTERFUSION_WEIGHTS`` (``make`` points it at ``../shared/weights``). A path that does not exist
here is also tried by its file name there: a bundle trained on another machine records the path it
was trained with, and the hash in its detector id (or backbone-feature key) says whether the file
found is the same.
"""

from __future__ import annotations

import os
from pathlib import Path

from posterfusion.errors import UserFileNotFound
from posterfusion.locations import Location

ENV = "POSTERFUSION_WEIGHTS"


def weights_folder() -> Path | None:
    """``$POSTERFUSION_WEIGHTS``, when set."""
    folder = os.environ.get(ENV)
    return Path(folder) if folder else None


def is_uri(weights: str | Path | None) -> bool:
    """Whether ``weights`` names a file in a store (``s3://…``) rather than a local path or a bare name."""
    return weights is not None and not Location(weights).is_local


def find_weights(weights: str | Path) -> Path | None:
    """The file ``weights`` names: the path itself, else its file name under ``$POSTERFUSION_WEIGHTS``;
    a URI's local copy (fetched on first use; None when nothing is there, an error when the store fails)."""
    if is_uri(weights):
        try:
            return Location(weights).cached_file()
        except UserFileNotFound:
            return None
    path = Path(weights)
    if path.is_file():
        return path
    folder = weights_folder()
    if folder is not None and (folder / path.name).is_file():
        return folder / path.name
    return None


def where_looked(weights: str | Path) -> str:
    """Where :func:`find_weights` looked, in words (for the one-line error)."""
    if is_uri(weights):
        return f"{Location(weights)} (nothing there)"
    path, folder = Path(weights), weights_folder()
    here = f"{path}" if len(path.parts) > 1 else f"{path} in the working directory"
    there = f"$POSTERFUSION_WEIGHTS ({folder})" if folder else "$POSTERFUSION_WEIGHTS (not set)"
    return f"{here} and {there}"


def require_weights(weights: str | Path, what: str = "weights file") -> Path:
    """:func:`find_weights`, or a :class:`UserFileNotFound` saying where it looked."""
    found = find_weights(weights)
    if found is None:
        raise UserFileNotFound(f"{what} {Location(weights).name} not found: looked at {where_looked(weights)}")
    return found
