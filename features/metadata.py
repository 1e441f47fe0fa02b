"""Movie metadata → a fixed-length float vector for the fused model.

Most posters have no metadata at all, so missing is the normal case, not an error: every
field has a missing indicator and the row a ``has_metadata`` flag, and a fully missing row
encodes to zeros plus those flags. The network can then learn "no metadata" as a state of its
own instead of reading a fake mean value as evidence.

Statistics and category lists are fitted on the training split only and stored as JSON
beside the model, so scoring and serving encode exactly as training did.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

STANDARDISED = ("year", "runtime", "imdb_score")
LOG_STANDARDISED = ("num_votes", "budget", "gross", "popularity")  # heavy-tailed counts and money
NUMERIC = STANDARDISED + LOG_STANDARDISED
CATEGORICAL = ("content_rating", "language", "country")
FIELDS = NUMERIC + CATEGORICAL
OTHER = "other"
CLIP = 5.0


class NumericStats(BaseModel):
    mean: float
    std: float = Field(gt=0)
    log: bool = Field(description="log1p before standardising (negatives clipped to 0 first)")


class MetadataEncoder(BaseModel):
    """Standardised numerics, top-k one-hot categoricals, missing indicators, ``has_metadata``.

    Layout (see :meth:`feature_names`): one value per numeric field, then per categorical field
    one slot per kept category plus ``other``, then one ``<field>_missing`` flag per field, then
    ``has_metadata``.
    """

    top_k: int = Field(8, ge=1)
    numeric: dict[str, NumericStats]
    categories: dict[str, list[str]] = Field(description="kept categories per field, most frequent first")

    @classmethod
    def fit(cls, frame: pd.DataFrame, top_k: int = 8) -> MetadataEncoder:
        """Fit on the training split. Std is the population std (ddof=0), as scikit-learn's scaler."""
        numeric = {}
        for name in NUMERIC:
            values = _numeric_column(frame, name, log=name in LOG_STANDARDISED).dropna()
            mean = float(values.mean()) if len(values) else 0.0
            std = float(values.std(ddof=0)) if len(values) else 0.0
            numeric[name] = NumericStats(mean=mean, std=std if std > 1e-12 else 1.0, log=name in LOG_STANDARDISED)
        categories = {}
        for name in CATEGORICAL:
            counts = _categorical_column(frame, name).dropna().value_counts()
            ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
            categories[name] = [value for value, _ in ranked[:top_k]]
        return cls(top_k=top_k, numeric=numeric, categories=categories)

    @property
    def dim(self) -> int:
        return len(NUMERIC) + sum(len(self.categories[f]) + 1 for f in CATEGORICAL) + len(FIELDS) + 1

    def feature_names(self) -> list[str]:
        names = list(NUMERIC)
        for field in CATEGORICAL:
            names += [f"{field}={value}" for value in self.categories[field]] + [f"{field}={OTHER}"]
        return names + [f"{field}_missing" for field in FIELDS] + ["has_metadata"]

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """Encode every row of ``frame``; absent columns and pd.NA / NaN / None are missing."""
        n = len(frame)
        blocks, missing = [], []
        for name in NUMERIC:
            stats = self.numeric[name]
            values = _numeric_column(frame, name, log=stats.log).to_numpy(dtype=np.float64, na_value=np.nan)
            absent = np.isnan(values)
            scaled = np.clip((values - stats.mean) / stats.std, -CLIP, CLIP)
            blocks.append(np.where(absent, 0.0, scaled)[:, None])
            missing.append(absent)
        for name in CATEGORICAL:
            values = _categorical_column(frame, name)
            absent = values.isna().to_numpy()
            kept = self.categories[name]
            index = values.map({v: i for i, v in enumerate(kept)}).fillna(len(kept)).to_numpy(dtype=np.int64)
            one_hot = np.zeros((n, len(kept) + 1))
            one_hot[np.arange(n), index] = 1.0
            one_hot[absent] = 0.0
            blocks.append(one_hot)
            missing.append(absent)
        missing = np.stack(missing, axis=1).astype(np.float64) if n else np.zeros((0, len(FIELDS)))
        has_metadata = (missing.min(axis=1, initial=1.0) == 0.0)[:, None]
        return np.concatenate([*blocks, missing, has_metadata], axis=1).astype(np.float32)

    def transform_records(self, records: Iterable[dict | None]) -> np.ndarray:
        """Encode online requests: each record holds any subset of the fields, or is None."""
        rows = [_checked_record(record) for record in records]
        frame = pd.DataFrame(rows, columns=list(FIELDS), dtype=object)
        return self.transform(frame)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: str | Path) -> MetadataEncoder:
        return cls.model_validate(json.loads(Path(path).read_text()))


def _numeric_column(frame: pd.DataFrame, name: str, log: bool) -> pd.Series:
    """Float values with NaN for missing (non-finite values count as missing too)."""
    if name not in frame:
        return pd.Series(np.nan, index=frame.index, dtype="float64")
    values = pd.to_numeric(frame[name], errors="coerce").astype("float64")
    values = values.where(np.isfinite(values))
    return np.log1p(values.clip(lower=0)) if log else values


def _categorical_column(frame: pd.DataFrame, name: str) -> pd.Series:
    """Stripped strings with None for missing; empty strings are missing as well."""
    if name not in frame:
        return pd.Series(None, index=frame.index, dtype=object)
    values = frame[name].astype(object).where(frame[name].notna(), None)
    values = values.map(lambda v: None if v is None else (str(v).strip() or None))
    return values.astype(object)


def _checked_record(record: dict | None) -> dict:
    """Reject unknown keys and wrongly typed values: a typo must not silently mean "missing"."""
    if record is None:
        return {}
    if not isinstance(record, dict):
        raise ValueError(f"metadata must be a dict or None, got {type(record).__name__}")
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown metadata fields {unknown}; expected a subset of {list(FIELDS)}")
    for key, value in record.items():
        if _is_missing(value):
            continue
        if key in NUMERIC and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise ValueError(f"metadata field {key!r} must be a number, got {type(value).__name__}")
        if key in CATEGORICAL and not isinstance(value, str):
            raise ValueError(f"metadata field {key!r} must be a string, got {type(value).__name__}")
    return {key: None if _is_missing(value) else value for key, value in record.items()}


def _is_missing(value) -> bool:
    if value is None or value is pd.NA:
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isnan(float(value))
