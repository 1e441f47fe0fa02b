"""Failure injection for the fault-tolerance tests: wrappers the tests install, never production knobs.

Ray ships these functions to its workers; :func:`by_value` makes Ray's cloudpickle send this
module's code itself, since the workers cannot import ``tests``. The scoring-actor wrappers hold
the real ``ScoreBatch`` (imported inside the worker, where nothing is patched) rather than
subclass it: a subclass installed under the module's own ``ScoreBatch`` name would make
cloudpickle copy the base class by value while its methods still resolve by reference, and
their ``super()`` would then refer to a different class than the instance's.
"""

from __future__ import annotations

import os
from pathlib import Path


def by_value() -> None:
    import sys

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def failing_train_loop(after_epoch: int, marker: Path):
    """A Ray Train loop that fails once, right after reporting ``after_epoch``'s checkpoint.

    ``marker`` (a file the first failure writes) keeps the restarted workers from failing again;
    ``marker`` + ``.reports`` lists, a line each, the epochs whose checkpoint was reported, across
    the restart: a run that resumed goes on from a late epoch, one that started over from epoch 1.
    """

    def loop(raw_config: dict) -> None:
        import ray.train

        from posterfusion.jobs.train import loop as train

        real = ray.train.report

        def report(metrics, checkpoint=None, **kwargs):
            real(metrics, checkpoint=checkpoint, **kwargs)
            if checkpoint is not None:  # rank 0's report
                with open(f"{marker}.reports", "a") as reports:
                    reports.write(f"{metrics['epoch']}\n")
            if metrics["epoch"] == after_epoch and not os.path.exists(marker):
                Path(marker).parent.mkdir(parents=True, exist_ok=True)
                Path(marker).write_text(f"failed after epoch {after_epoch}\n")
                raise RuntimeError(f"injected failure after epoch {after_epoch}")

        ray.train.report = report
        try:
            train.train_loop(raw_config)
        finally:
            ray.train.report = real

    return loop


def dying_score_batch(after_calls: int, marker: Path):
    """A scoring actor class whose first instance to reach ``after_calls`` batches exits its process, once.

    ``marker`` records the kill (and keeps the restarted actor alive); Ray Data restarts the actor
    and retries the batch it lost.
    """

    class DyingScoreBatch:
        def __init__(self, *args, **kwargs):
            from posterfusion.jobs.score import ScoreBatch

            self.inner, self.calls = ScoreBatch(*args, **kwargs), 0

        def __call__(self, batch):
            self.calls += 1
            if self.calls >= after_calls:
                try:
                    Path(marker).parent.mkdir(parents=True, exist_ok=True)
                    with open(marker, "x") as handle:
                        handle.write(str(os.getpid()))
                    os._exit(1)
                except FileExistsError:
                    pass
            return self.inner(batch)

    return DyingScoreBatch


def pixels_id(image) -> str:
    """A decoded image's identity: the hash of its RGB pixels."""
    import hashlib

    return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


def detector_failing_on(pixels: str):
    """A scoring actor class whose detector raises on the one image whose :func:`pixels_id` is ``pixels``."""

    class FailingDetectorScoreBatch:
        def __init__(self, *args, **kwargs):
            from posterfusion.jobs.score import ScoreBatch

            self.inner = ScoreBatch(*args, **kwargs)
            detector = self.inner.predictor.detector
            real = detector.detect

            def detect(images, *more, **options):
                if any(pixels_id(image) == pixels for image in images):
                    raise RuntimeError("injected detector failure")
                return real(images, *more, **options)

            detector.detect = detect

        def __call__(self, batch):
            return self.inner(batch)

    return FailingDetectorScoreBatch


class StopAfter(RuntimeError):
    """Raised by :func:`stopping_commit`: the run ends as if its driver were killed."""


def stopping_commit(files: int):
    """A ``Committer.commit`` that raises after committing ``files`` files."""
    from posterfusion.features.lease import commit_file

    done = []

    def commit(self, path, write):
        if len(done) >= files:
            raise StopAfter(f"stopped after {files} files")
        done.append(path)
        return commit_file(path, write)

    return commit
