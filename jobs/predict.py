"""``posterfusion predict``: the bundle's Predictor on poster files, no cluster needed."""

from __future__ import annotations

from pathlib import Path

from posterfusion.models.predictor import PosterError, Prediction, Predictor


def predict_files(model: Path, posters: list[Path], batch_size: int = 16
                  ) -> list[tuple[Path, Prediction | PosterError]]:
    """Each file's Prediction, or the PosterError saying why it could not be scored."""
    predictor = Predictor(model)
    results = []
    for start in range(0, len(posters), batch_size):
        chunk = posters[start:start + batch_size]
        results += zip(chunk, predictor.predict([p.read_bytes() for p in chunk]), strict=True)
    return results


def format_prediction(path: Path, prediction: Prediction | PosterError) -> str:
    if isinstance(prediction, PosterError):
        return f"{path.name}: not scored ({prediction.reason})"
    top = ", ".join(f"{genre} {p:.2f}" for genre, p in prediction.top3)
    seen = ", ".join(f"{o.count}×{o.name}" if o.count > 1 else o.name for o in prediction.objects) or "none"
    return f"{path.name}: {top} | predicted set: {', '.join(prediction.genres) or '-'} | objects: {seen}"
