"""``posterfusion train``: fine-tune the fusion network with Ray Train and write a calibrated bundle.

    config.py    the one configuration tree (TrainConfig), the data's facts, a worker's plan, --set
    recipes.py   named recipes: typed partial trees, resolved with --from-scratch and overrides
    data.py      the driver's data: labelled rows, vocabulary, encoders, facts, Ray Datasets
    loop.py      the worker loop every Ray Train worker runs
    run.py       run_train: Ray Train runs (one, or a warm-up and its members)
    combine.py   members made into one bundle: an output ensemble or a weight soup
    finish.py    calibration, thresholds, the bundle, the summary
"""

from __future__ import annotations

import importlib

# Resolved on first use, not here: every Ray Train worker imports this package to reach loop.py, and
# the driver's modules (run, finish, combine) are no worker's business (the loop's import: 6.2 → 5.8 s here).
_EXPORTS = {"TrainConfig": "config", "format_train_summary": "finish", "run_train": "run"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
