"""Where pretrained weights files are found: the one lookup for backbones and detectors alike.

A weights file is named by a path, or by a bare file name looked up in ``$POSTERFUSION_WEIGHTS``
(``make`` points it at ``../shared/weights``). A path that does not exist here is also tried by
its file name there: a bundle trained on another machine records the path it was trained with,
and the hash in its detector id (or backbone-feature key) says whether the file found is the same.
"""

from __future__ import annotations

import os
from pathlib import Path

from posterfusion.errors import UserFileNotFound

ENV = "POSTERFUSION_WEIGHTS"


def weights_folder() -> Path | None:
    """``$POSTERFUSION_WEIGHTS``, when set."""
    folder = os.environ.get(ENV)
    return Path(folder) if folder else None


def find_weights(weights: str | Path) -> Path | None:
    """The file ``weights`` names: the path itself, else its file name under ``$POSTERFUSION_WEIGHTS``."""
    path = Path(weights)
    if path.is_file():
        return path
    folder = weights_folder()
    if folder is not None and (folder / path.name).is_file():
        return folder / path.name
    return None


def where_looked(weights: str | Path) -> str:
    """Where :func:`find_weights` looked, in words (for the one-line error)."""
    path, folder = Path(weights), weights_folder()
    here = f"{path}" if len(path.parts) > 1 else f"{path} in the working directory"
    there = f"$POSTERFUSION_WEIGHTS ({folder})" if folder else "$POSTERFUSION_WEIGHTS (not set)"
    return f"{here} and {there}"


def require_weights(weights: str | Path, what: str = "weights file") -> Path:
    """:func:`find_weights`, or a :class:`UserFileNotFound` saying where it looked."""
    found = find_weights(weights)
    if found is None:
        raise UserFileNotFound(f"{what} {Path(weights).name} not found: looked at {where_looked(weights)}")
    return found
