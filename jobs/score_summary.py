"""What a scoring run did, read back from its own files, and how its predictions moved since the last run.

``OUT/_runs/<run_id>.json`` (committed whole): counts, posters/s, errors by reason, where object
features came from, the genre distribution (each genre's mean probability, its standard
deviation and ``n``) and the drift against the previous run **of the same model version** — a
new model version changes every probability and is not drift.

Drift is only worth an alert when it exceeds sampling noise: each genre's shift in mean
probability comes with the standard error of that difference,
``sqrt(sd_now² / n_now + sd_before² / n_before)`` (what a bootstrap of the two means estimates),
and ``z = shift / se``; a genre with ``|z| > 3`` is listed as beyond noise. A nightly run that
scored 12 new posters can move a mean by 0.05 without anything having changed.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pandas as pd

from posterfusion.locations import Location

Z_ALERT = 3.0


def describe_run(out: Path | Location, written: list[Location], seconds: float, run_id: str, version: str) -> dict:
    """Counts read back from this run's files, the genre distribution, and drift against the last run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from posterfusion.models.predictions import probability_column

    def needed(name: str) -> bool:  # never the detections: the heaviest column, and not summarised
        return name.startswith("p_") or name in ("error", "objects_source", "genres")

    def read(file: Location) -> pa.Table:
        names = pq.read_schema(file.fs_path, filesystem=file.filesystem).names
        return pq.read_table(file.fs_path, columns=[c for c in names if needed(c)], filesystem=file.filesystem)

    table = pa.concat_tables([read(Location.parse(f)) for f in written]) if written else None
    frame = table.to_pandas() if table is not None else pd.DataFrame()
    genres = [c[2:] for c in frame.columns if c.startswith("p_")]
    ok = frame[frame["error"].isna()] if len(frame) else frame
    distribution = {g: {"mean": round(float(ok[probability_column(g)].mean()), 6),
                        "sd": round(float(ok[probability_column(g)].std(ddof=1)), 6) if len(ok) > 1 else 0.0}
                    for g in genres} if len(ok) else {}
    errors = frame["error"].dropna() if len(frame) else pd.Series(dtype=str)
    return {
        "scored": len(frame),
        "errors": {"count": len(errors), "reasons": dict(Counter(e.split(":", 1)[0] for e in errors))},
        "seconds": round(seconds, 2),
        "posters_per_s": round(len(frame) / seconds, 2) if seconds > 0 else None,
        "objects_source": dict(Counter(frame["objects_source"])) if len(frame) else {},
        "genre_distribution": {
            "n": len(ok),
            "mean_probability": {g: d["mean"] for g, d in distribution.items()},
            "sd_probability": {g: d["sd"] for g, d in distribution.items()},
            "predicted_count": dict(Counter(g for gs in ok["genres"] for g in gs)) if len(ok) else {},
        },
        "drift": drift(out, distribution, len(ok), run_id, version),
        "files": [str(f) for f in written],
    }


def drift(out: Path | Location, distribution: dict, n: int, run_id: str, version: str) -> dict | None:
    """Each genre's mean probability now minus in the last run of this model version, with its noise.

    None when this model version has no earlier run that scored anything, or nothing was scored now.
    """
    previous = [s for s in summaries(out) if s["run_id"] != run_id and s.get("scored")
                and s["model_version"] == version]
    if not distribution or not previous:
        return None
    last = previous[-1]["genre_distribution"]
    n_before = last.get("n") or previous[-1]["scored"]
    genres = {}
    for genre, now in distribution.items():
        if genre not in last["mean_probability"]:
            continue
        shift = now["mean"] - last["mean_probability"][genre]
        se = math.sqrt(now["sd"] ** 2 / max(n, 1) + last.get("sd_probability", {}).get(genre, 0.0) ** 2
                       / max(n_before, 1))
        genres[genre] = {"shift": round(shift, 6), "se": round(se, 6),
                         "z": round(shift / se, 2) if se > 0 else None}
    largest = max(genres, key=lambda g: abs(genres[g]["shift"])) if genres else None
    return {"previous_run": previous[-1]["run_id"], "n": n, "previous_n": n_before, "genres": genres,
            "largest": {"genre": largest, **genres[largest]} if largest else None,
            "beyond_noise": sorted(g for g, d in genres.items() if d["z"] is not None and abs(d["z"]) > Z_ALERT)}


def format_drift(drift_report: dict | None) -> str:
    if not drift_report:
        return "no earlier run of this model version to compare"
    largest = drift_report["largest"]
    noisy = ", ".join(drift_report["beyond_noise"]) or "none"
    z = f", z {largest['z']:+.1f}" if largest["z"] is not None else ""
    return (f"vs run {drift_report['previous_run']} (n {drift_report['n']} vs {drift_report['previous_n']}): "
            f"largest {largest['genre']} {largest['shift']:+.4f} (± {largest['se']:.4f}{z}); "
            f"beyond noise (|z| > {Z_ALERT:g}): {noisy}")


def summaries(out: Path | Location) -> list[dict]:
    """Every committed run summary, oldest first (run ids start with their UTC time)."""
    return [json.loads(f.read_text()) for f in (Location.parse(out) / "_runs").list_files(".json", recursive=False)]


def save_summary(out: Path | Location, summary: dict) -> Location:
    """``OUT/_runs/<run_id>.json``, written atomically (a local path or an object store alike)."""
    location = Location.parse(out) / "_runs" / f"{summary['run_id']}.json"
    location.write_text(json.dumps(summary, indent=2))
    return location
