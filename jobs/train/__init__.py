"""``posterfusion train``: fine-tune the fusion network with Ray Train and write a calibrated bundle.

    config.py    the one configuration tree (TrainConfig), the data's facts, a worker's plan, --set
    recipes.py   named recipes: typed partial trees, resolved with --from-scratch and overrides
    data.py      the driver's data: labelled rows, vocabulary, encoders, facts, Ray Datasets
    loop.py      the worker loop every Ray Train worker runs
    run.py       run_train: Ray Train runs (one, or a warm-up and its members)
    combine.py   members made into one bundle: an output ensemble or a weight soup
    finish.py    calibration, thresholds, the bundle, the summary
"""

from posterfusion.jobs.train.config import TrainConfig
from posterfusion.jobs.train.finish import format_train_summary
from posterfusion.jobs.train.run import run_train

__all__ = ["TrainConfig", "format_train_summary", "run_train"]
