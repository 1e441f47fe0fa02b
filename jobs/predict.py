"""``posterfusion predict``: the bundle's Predictor on poster files, no cluster needed.

The bundle and the posters may be local paths or URIs (``--model s3://bucket/models/v3``): the bundle
is read from a local copy downloaded once, each poster is read from wherever it is.
"""

from __future__ import annotations

from pathlib import Path

from posterfusion.locations import Location
from posterfusion.models.predictor import PosterError, Prediction, Predictor


def predict_files(model: str | Path | Location, posters: list[str | Path | Location], batch_size: int = 16
                  ) -> list[tuple[Location, Prediction | PosterError]]:
    """Each file's Prediction, or the PosterError saying why it could not be scored."""
    predictor = Predictor(model)
    files = [Location.parse(p) for p in posters]
    results = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        results += zip(chunk, predictor.predict([p.read_bytes() for p in chunk]), strict=True)
    return results


def format_prediction(path: str | Path | Location, prediction: Prediction | PosterError) -> str:
    name = Location.parse(path).name
    if isinstance(prediction, PosterError):
        return f"{name}: not scored ({prediction.reason})"
    top = ", ".join(f"{genre} {p:.2f}" for genre, p in prediction.top3)
    seen = ", ".join(f"{o.count}×{o.name}" if o.count > 1 else o.name for o in prediction.objects) or "none"
    return f"{name}: {top} | predicted set: {', '.join(prediction.genres) or '-'} | objects: {seen}"
