"""The classic (non-deep) baseline: hand-crafted poster statistics and a linear classifier.

A deep model's number means little without an honest baseline beside it, so every
evaluation reports this one too. The descriptor is cheap (a few milliseconds per poster on
one CPU, numpy only) and fixed-length; :func:`statistic_names` gives its layout:

====================  ====  ======================================================
block                 size  what
====================  ====  ======================================================
``rgb_mean/std_*``      6   per-channel mean and std of R, G, B in [0, 1]
``hsv_mean/std_*``      6   per-channel mean and std of H, S, V in [0, 1]
``hsv_hist_*``         72   joint histogram, 8 hue × 3 saturation × 3 value, sums to 1
``share_*``             3   share of dark, bright and saturated pixels
``colourfulness``       1   Hasler–Süsstrunk colourfulness (0 for a grayscale poster)
``grad_hist_*``         8   Sobel gradient-magnitude histogram, sums to 1
``grad_mean``           1   mean gradient magnitude
``edge_density``        1   share of pixels on an edge (magnitude above a threshold)
``grad_orient_*``       8   unsigned gradient orientation, magnitude-weighted, sums to 1
``lbp_*``              10   rotation-invariant uniform 8-neighbour LBP histogram, sums to 1
``grid_v_*/grid_s_*``  18   mean value and saturation in a 3×3 grid (row-major)
``aspect_ratio``        1   width / height of the poster before resizing
====================  ====  ======================================================

:class:`ClassicBaseline` is a standard scaler plus one logistic regression per genre;
:func:`featurize_posters` turns poster bytes into the feature matrix, never dropping
a poster silently.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field

from posterfusion.features.catalogue import PosterDecodeError, decode_rgb

HUE_BINS, SAT_BINS, VAL_BINS = 8, 3, 3
GRAD_EDGES = (0.0, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75)  # lower bin edges, magnitude / 4
EDGE_THRESHOLD = 0.25  # a 0→1 step gives 1.0 after the / 4 normalisation
ORIENT_BINS = 8
LBP_BINS = 10  # riu2 codes 0..8 (number of brighter-or-equal neighbours) + non-uniform
GRID = 3
DARK, BRIGHT, SATURATED = 0.2, 0.8, 0.5


def statistic_names() -> list[str]:
    """Names of :func:`poster_statistics` entries, in order (independent of ``size``)."""
    names = [f"rgb_{stat}_{c}" for stat in ("mean", "std") for c in "rgb"]
    names += [f"hsv_{stat}_{c}" for stat in ("mean", "std") for c in "hsv"]
    names += [f"hsv_hist_h{h}_s{s}_v{v}" for h in range(HUE_BINS) for s in range(SAT_BINS) for v in range(VAL_BINS)]
    names += ["share_dark", "share_bright", "share_saturated", "colourfulness"]
    names += [f"grad_hist_{i}" for i in range(len(GRAD_EDGES))] + ["grad_mean", "edge_density"]
    names += [f"grad_orient_{i}" for i in range(ORIENT_BINS)]
    names += [f"lbp_riu2_{i}" for i in range(LBP_BINS - 1)] + ["lbp_nonuniform"]
    names += [f"grid_{ch}_{r}{c}" for ch in "vs" for r in range(GRID) for c in range(GRID)]
    return [*names, "aspect_ratio"]


def poster_statistics(image: Image.Image, size: int = 64) -> np.ndarray:
    """The hand-crafted descriptor of one poster (float32, ``len(statistic_names())``).

    Computed on the poster resized to ``size``×``size`` so that every poster costs the same
    and the statistics do not depend on its resolution; the aspect ratio, lost by the
    resize, is kept as its own entry.
    """
    aspect = image.width / max(image.height, 1)
    small = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    rgb = np.asarray(small, dtype=np.float32) / 255.0
    hsv = np.asarray(small.convert("HSV"), dtype=np.float32) / 255.0
    gray = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]  # elementwise: no BLAS threads
    parts = [_colour(rgb, hsv), _gradients(gray), _lbp_histogram(gray), _grid_means(hsv), [aspect]]
    return np.concatenate([np.asarray(p, dtype=np.float32).ravel() for p in parts])


def _colour(rgb: np.ndarray, hsv: np.ndarray) -> np.ndarray:
    """Moments, the joint HSV histogram, dark/bright/saturated shares and colourfulness.

    Hue is a circle, so its mean is crude; the joint histogram is what carries hue (and
    keeps gray pixels, whose hue is meaningless, in the low-saturation bins).
    """
    flat_rgb, flat_hsv = rgb.reshape(-1, 3), hsv.reshape(-1, 3)
    h = np.minimum((flat_hsv[:, 0] * HUE_BINS).astype(np.int64), HUE_BINS - 1)
    s = np.minimum((flat_hsv[:, 1] * SAT_BINS).astype(np.int64), SAT_BINS - 1)
    v = np.minimum((flat_hsv[:, 2] * VAL_BINS).astype(np.int64), VAL_BINS - 1)
    joint = np.bincount((h * SAT_BINS + s) * VAL_BINS + v, minlength=HUE_BINS * SAT_BINS * VAL_BINS)
    shares = [(flat_hsv[:, 2] < DARK).mean(), (flat_hsv[:, 2] > BRIGHT).mean(), (flat_hsv[:, 1] > SATURATED).mean()]
    return np.concatenate([flat_rgb.mean(0), flat_rgb.std(0), flat_hsv.mean(0), flat_hsv.std(0),
                           joint / len(flat_hsv), shares, [_colourfulness(flat_rgb)]])


def _colourfulness(flat_rgb: np.ndarray) -> float:
    """Hasler & Süsstrunk (2003): spread and offset of the opponent rg / yb channels."""
    r, g, b = flat_rgb.T
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def _gradients(gray: np.ndarray) -> np.ndarray:
    """Sobel magnitude histogram, mean, edge density and orientation histogram.

    Magnitudes are divided by 4 so that a full black-to-white step scores 1; the
    orientation histogram is unsigned (an edge and its mirror are one orientation) and
    weighted by magnitude, so flat areas do not vote.
    """
    p = np.pad(gray, 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    magnitude = np.hypot(gx, gy).ravel() / 4.0
    bins = np.searchsorted(np.asarray(GRAD_EDGES[1:]), magnitude, side="right")
    histogram = np.bincount(bins, minlength=len(GRAD_EDGES)) / magnitude.size
    angle = np.mod(np.arctan2(gy, gx).ravel(), np.pi)
    which = np.minimum((angle / np.pi * ORIENT_BINS).astype(np.int64), ORIENT_BINS - 1)
    orientation = np.bincount(which, weights=magnitude, minlength=ORIENT_BINS)
    orientation = orientation / max(float(orientation.sum()), 1e-12)
    return np.concatenate([histogram, [magnitude.mean(), (magnitude > EDGE_THRESHOLD).mean()], orientation])


def _riu2_table() -> np.ndarray:
    """8-bit LBP code → rotation-invariant uniform label (0..8 set bits, 9 = non-uniform)."""
    codes = np.arange(256)
    bits = (codes[:, None] >> np.arange(8)) & 1
    transitions = (bits != np.roll(bits, 1, axis=1)).sum(1)
    return np.where(transitions <= 2, bits.sum(1), LBP_BINS - 1)


_RIU2 = _riu2_table()  # 256 entries: negligible at import time
# the 8 neighbours in circular order, so that bit transitions are meaningful
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))


def _lbp_histogram(gray: np.ndarray) -> np.ndarray:
    """Local binary patterns on the quantised gray image, as a riu2 histogram.

    Quantising to 8 bits first keeps JPEG-level noise from flipping codes on flat areas.
    """
    q = np.round(gray * 255.0).astype(np.int16)
    p = np.pad(q, 1, mode="edge")
    height, width = q.shape
    code = np.zeros(q.shape, dtype=np.uint8)
    for bit, (dy, dx) in enumerate(_NEIGHBOURS):
        code |= (p[1 + dy:1 + dy + height, 1 + dx:1 + dx + width] >= q).astype(np.uint8) << bit
    return np.bincount(_RIU2[code.ravel()], minlength=LBP_BINS) / code.size


def _grid_means(hsv: np.ndarray) -> np.ndarray:
    """Mean value then mean saturation of each cell of a 3×3 grid: a coarse layout."""
    rows = np.array_split(np.arange(hsv.shape[0]), GRID)
    cols = np.array_split(np.arange(hsv.shape[1]), GRID)
    cells = [hsv[r[0]:r[-1] + 1, c[0]:c[-1] + 1] for r in rows for c in cols]
    return np.array([[cell[..., channel].mean() for cell in cells] for channel in (2, 1)])


def featurize_posters(posters: Sequence[bytes | None], size: int = 64) -> tuple[np.ndarray, list[str | None]]:
    """Descriptors of encoded posters, one row each, plus one error reason per poster.

    A poster that cannot be decoded (or yields a non-finite descriptor) gets a zero row and
    its reason instead of raising or being dropped, so callers keep rows aligned with ids
    and can report which posters the baseline never saw.
    """
    width = len(statistic_names())
    features = np.zeros((len(posters), width), dtype=np.float32)
    errors: list[str | None] = []
    for row, data in enumerate(posters):
        try:
            values = poster_statistics(decode_rgb(data), size)
        except PosterDecodeError as exc:
            errors.append(str(exc))
            continue
        except (OSError, ValueError, MemoryError) as exc:
            errors.append(f"feature_error: {exc}"[:200])
            continue
        if not np.isfinite(values).all():
            errors.append("non_finite_features")
            continue
        features[row] = values
        errors.append(None)
    return features, errors


class ClassicConfig(BaseModel):
    C: float = Field(0.1, gt=0, description="inverse L2 strength; 135 features on a few thousand posters overfit at 1")
    max_iter: int = Field(2000, ge=1, description="lbfgs iterations; scaled features converge well below")
    class_weight: str | None = Field(None, description="None keeps probabilities calibrated (a fair top-3 "
                                     "beside the calibrated model); 'balanced' reweights rare genres")
    blas_threads: int = Field(1, ge=1, description="BLAS/OpenMP threads while fitting and predicting")


class ClassicBaseline:
    """Standard scaler + one logistic regression per genre (one-vs-rest).

    A loop over genres rather than ``OneVsRestClassifier`` so that a genre with only one
    class in training is handled explicitly: its score is its training prevalence, a
    constant (0 or 1), which is all the training data can say about it.

    The problems are tiny (hundreds of features), so BLAS threads only add contention: on a
    box shared with training they made one fit 10–40× slower (40 ms → 0.5–1.8 s). Fitting
    and predicting run under ``blas_threads`` (1 by default).
    """

    def __init__(self, config: ClassicConfig | None = None):
        self.config = config or ClassicConfig()
        self.scaler_ = None
        self.models_: list = []

    def fit(self, features: np.ndarray, labels: np.ndarray) -> ClassicBaseline:
        from threadpoolctl import threadpool_limits

        features, labels = np.asarray(features, dtype=np.float64), np.asarray(labels) > 0.5
        if labels.ndim != 2 or len(labels) != len(features):
            raise ValueError(f"labels must be (n, genres) with n = {len(features)}: got {labels.shape}")
        with threadpool_limits(self.config.blas_threads):
            self._fit(features, labels)
        return self

    def _fit(self, features: np.ndarray, labels: np.ndarray) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        self.scaler_ = StandardScaler().fit(features)
        scaled = self.scaler_.transform(features)
        self.models_ = []
        for target in labels.T:
            if target.min() == target.max():
                self.models_.append(float(target.mean()))
                continue
            model = LogisticRegression(C=self.config.C, max_iter=self.config.max_iter,
                                       class_weight=self.config.class_weight)  # lbfgs: no randomness
            self.models_.append(model.fit(scaled, target))

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Per-genre positive probabilities, shape ``(n, genres)``."""
        from threadpoolctl import threadpool_limits

        if self.scaler_ is None:
            raise RuntimeError("ClassicBaseline.fit must be called before predict_proba")
        with threadpool_limits(self.config.blas_threads):
            scaled = self.scaler_.transform(np.asarray(features, dtype=np.float64))
            columns = [np.full(len(scaled), model) if isinstance(model, float) else model.predict_proba(scaled)[:, 1]
                       for model in self.models_]
        return np.stack(columns, axis=1).astype(np.float32) if columns else np.zeros((len(scaled), 0), np.float32)
