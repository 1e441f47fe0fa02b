"""How scoring's cost grows: time vs catalogue size, a nightly rerun, and memory of the driver and actors.

For each size (the first N rows of the catalogue) one ``posterfusion score`` run into a fresh
output, then a second run over the same, unchanged catalogue (the nightly case: nothing new to
score). A sampler thread records, every ``--sample-s`` seconds, the unique memory (USS) of the
driver and of every scoring actor process; the peaks are printed per run. Linear cost means
seconds per poster stays flat across sizes; streaming means the peaks do not grow with N.

    python benchmarks/score_cost.py --model M --catalogue C --features F --sizes 1000 2000 6310
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

from score_throughput import subset_catalogue  # same folder: run as `python benchmarks/score_cost.py`

ACTOR_MARKERS = ("ScoreBatch", "MapWorker")


class MemorySampler:
    """Peak USS (MiB) of this process and of each of Ray's scoring actor processes while it runs."""

    def __init__(self, interval: float):
        self.interval, self.driver, self.actors = interval, 0.0, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        me = psutil.Process(os.getpid())
        while True:  # a sample at once, then every interval: a run shorter than one still has its peak
            self.driver = max(self.driver, _uss(me))
            for process in psutil.process_iter(["cmdline"]):
                command = " ".join(process.info["cmdline"] or [])
                if command.startswith("ray::") and any(m in command for m in ACTOR_MARKERS):
                    self.actors[process.pid] = max(self.actors.get(process.pid, 0.0), _uss(process))
            if self._stop.wait(self.interval):
                return


def _uss(process) -> float:
    import psutil

    try:
        return process.memory_full_info().uss / 2**20
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0.0


def score_once(model: Path, catalogue: Path, features: Path | None, out: Path, interval: float) -> dict:
    from posterfusion.jobs.score import ScoreConfig, run_score

    with MemorySampler(interval) as memory:
        started = time.perf_counter()
        summary = run_score(ScoreConfig(model=model, catalogue=catalogue, out=out, features=features))
        seconds = time.perf_counter() - started
    if not summary["reconciles"]:
        raise RuntimeError(f"the scorer did not reconcile: {summary}")
    return {"seconds": seconds, "scored": summary["scored"], "driver_mib": memory.driver,
            "actor_mib": max(memory.actors.values(), default=0.0),
            "each_actor": "/".join(f"{v:.0f}" for v in sorted(memory.actors.values(), reverse=True)) or "-"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--catalogue", type=Path, required=True)
    parser.add_argument("--features", type=Path, help="cached object features (else the detector runs)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 6310])
    parser.add_argument("--sample-s", type=float, default=0.5)
    parser.add_argument("--device", default="cpu", help="cuda: the actors take the cluster's GPUs (one must exist)")
    parser.add_argument("--address", default=None)
    args = parser.parse_args()

    from posterfusion.cluster import ClusterConfig, prepare_environment, ray_cluster

    prepare_environment()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, ray_cluster(ClusterConfig(address=args.address)) as cluster:
        for size in args.sizes:
            catalogue = subset_catalogue(args.catalogue, size, Path(tmp) / f"subset-{size}")
            out = Path(tmp) / f"scores-{size}"
            first = score_once(args.model, catalogue, args.features, out, args.sample_s)
            rerun = score_once(args.model, catalogue, args.features, out, args.sample_s)
            rows.append((size, first, rerun))
        if args.device == "cuda" and not cluster.gpus:
            raise SystemExit("--device cuda: the cluster has no GPU")
    print(f"bundle {args.model}; {'cached object features' if args.features else 'detector on every poster'}; "
          f"Ray: {cluster.nodes} node(s), {cluster.cpus:g} CPU, {cluster.gpus:g} GPU")
    print(f"{'posters':>8}{'first s':>9}{'ms/poster':>11}{'rerun s':>9}{'rerun/first':>13}"
          f"{'driver MiB':>12}{'rerun driver':>14}  each actor's peak MiB")
    for _size, first, rerun in rows:
        print(f"{first['scored']:>8}{first['seconds']:>9.1f}{1000 * first['seconds'] / max(first['scored'], 1):>11.2f}"
              f"{rerun['seconds']:>9.1f}{rerun['seconds'] / first['seconds']:>13.1%}"
              f"{first['driver_mib']:>12.0f}{rerun['driver_mib']:>14.0f}  {first['each_actor']}")
    (small, a, _), (large, b, _) = rows[0], rows[-1]
    print(f"growth {small} → {large} posters ({large / small:.1f}x): time {b['seconds'] / a['seconds']:.2f}x, "
          f"driver peak {b['driver_mib'] / max(a['driver_mib'], 1):.2f}x, actor peak "
          f"{b['actor_mib'] / max(a['actor_mib'], 1):.2f}x")


if __name__ == "__main__":
    main()
