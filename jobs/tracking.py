"""Every ``train``, ``route``, ``evaluate`` and ``compare`` run recorded in MLflow: researchers compare runs in a
tracker.

Logged from the driver, never from a Ray worker, so it works the same with outputs in object
storage and on several nodes. The store is ``MLFLOW_TRACKING_URI`` when set (a tracking server, a
database), else MLflow's own local default (``sqlite:///mlflow.db`` in the working directory).
A ``compare`` is one parent run; the trainings and evaluations it does are nested under it.
MLflow's telemetry is switched off by :func:`posterfusion.cluster.prepare_environment`.

What a run holds: params = the resolved configuration (dotted names, e.g. ``optim.lr``) and the
recipe; metrics = each epoch's validation figures (``step`` = epoch) and the final headline
numbers (per scorer and per slice for evaluations); artifacts = the report files and plots; tags =
the kind of run and where its bundle or report lives.

mlflow is imported inside these functions: it takes seconds, and only commands that record a run
should pay for it.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

EXPERIMENT = "posterfusion"
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")  # MLflow's allowed characters in a metric or param name


@contextlib.contextmanager
def tracked(kind: str, name: str | None, params: dict, tags: dict | None = None) -> Iterator[Run]:
    """An MLflow run for the block (nested under the active one, e.g. a ``compare``'s); it ends FAILED on error."""
    import mlflow

    if mlflow.get_experiment_by_name(EXPERIMENT) is None:  # set_experiment would log an INFO line on the console
        with contextlib.suppress(mlflow.exceptions.MlflowException):  # made meanwhile by another process
            mlflow.create_experiment(EXPERIMENT)
    mlflow.set_experiment(EXPERIMENT)  # a store that cannot be reached fails here, loudly
    with mlflow.start_run(run_name=name, nested=mlflow.active_run() is not None,
                          tags={"posterfusion.kind": kind, **(tags or {})}) as active:
        run = Run(active.info.run_id)
        run.params(params)
        yield run


class Run:
    """What the jobs record into their run."""

    def __init__(self, run_id: str):
        from mlflow import MlflowClient

        self.id, self.client = run_id, MlflowClient()

    def params(self, tree: dict) -> None:
        from mlflow.entities import Param

        flat = [Param(_safe(k), str(v)[:6000]) for k, v in _flat(tree).items()]
        for i in range(0, len(flat), 100):  # the tracking API takes 100 params a call
            self.client.log_batch(self.id, params=flat[i:i + 100])

    def metrics(self, values: dict, step: int = 0, prefix: str = "") -> None:
        """Every finite number of ``values`` (nested dicts flattened to dotted names)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(_safe(prefix + k), float(v), now, step) for k, v in _flat(values).items()
                 if isinstance(v, int | float) and not isinstance(v, bool) and v == v and abs(v) != float("inf")]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.id, metrics=batch[i:i + 1000])

    def history(self, epochs: list[dict], prefix: str = "") -> None:
        """Per-epoch training records, each at its epoch as the step."""
        for record in epochs:
            if isinstance(record.get("epoch"), int):
                self.metrics({k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"], prefix=prefix)

    def tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.id, key, value)

    def report(self, report: dict, out, files: list[str], prefix: str = "") -> None:
        """An evaluation report: each scorer's headline point values, the paired differences, every slice's,
        and the report's files (read from ``out``, a local path or a URI) as artifacts."""
        from posterfusion.locations import Location

        self.metrics(_points(report), prefix=prefix)
        for name, block in report.get("slices", {}).items():
            if block["intervals"] is not None:
                self.metrics(_points(block), prefix=f"{prefix}slice.{name}.")
        folder = Location(out)
        for name in files:
            if folder.join(name).exists():
                self.artifact(name, folder.join(name).read_bytes())

    def artifact(self, name: str, data: bytes) -> None:
        """A file's bytes as an artifact (reports may live in object storage: the bytes, not a path)."""
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / name
            path.write_bytes(data)
            self.client.log_artifact(self.id, str(path))


def _points(block: dict) -> dict:
    """``scorer.metric`` → point value, ``paired.a - b.metric`` → difference, ``ece.scorer`` where given."""
    points = {f"{scorer}.{metric}": values[0] for scorer, by in block["intervals"].items()
              for metric, values in by.items()}
    points |= {f"paired.{pair}.{metric}": result["diff"] for pair, by in (block.get("paired") or {}).items()
               for metric, result in by.items()}
    return points | {f"ece.{scorer}": value for scorer, value in (block.get("ece") or {}).items()}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", name.replace("@", "_at_"))[:250]
