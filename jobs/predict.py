"""``posterfusion predict``: the bundle's Predictor on poster files, no cluster needed."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from posterfusion.models.predictor import Prediction, Predictor


def predict_files(model: Path, posters: list[Path], batch_size: int = 16) -> list[tuple[Path, Prediction]]:
    predictor = Predictor(model)
    results = []
    for start in range(0, len(posters), batch_size):
        chunk = posters[start:start + batch_size]
        results += zip(chunk, predictor.predict([p.read_bytes() for p in chunk]), strict=True)
    return results


def format_prediction(path: Path, prediction: Prediction) -> str:
    top = ", ".join(f"{genre} {p:.2f}" for genre, p in prediction.top3)
    objects = Counter(d["name"] for d in prediction.detections)
    seen = ", ".join(f"{n}×{name}" if n > 1 else name for name, n in objects.most_common()) or "none"
    return f"{path.name}: {top} | predicted set: {', '.join(prediction.genres) or '-'} | objects: {seen}"
