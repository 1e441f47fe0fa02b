"""The genre vocabulary a model is trained on, and multi-hot labels from it.

Built from the training split only (validation and test genres must not shape it), with
three rules applied in order: merge synonyms, drop non-genres, then keep the ``top_n``
most frequent and fold the rest, or any genre under ``min_count``, into ``Other``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from posterfusion.locations import Location

OTHER = "Other"


class VocabConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    synonyms: dict[str, str] = Field(default_factory=lambda: {"Musical": "Music"})
    drop: list[str] = Field(default_factory=lambda: ["N/A"], description="labels that are no genre")
    min_count: int = Field(20, ge=0, description="rarer genres fold into Other")
    min_share: float = Field(0.0, ge=0, lt=1, description="so do genres on fewer than this share of posters")
    top_n: int | None = Field(None, ge=1, description="keep only the N most frequent")
    keep: list[str] | None = Field(None, description="keep only these genres (after synonyms)")
    fold_into_other: bool = Field(True, description="False drops rare genres instead")


class GenreVocabulary(BaseModel):
    """Ordered genres (most frequent first) and how every raw label maps onto them."""

    genres: list[str]
    mapping: dict[str, str | None] = Field(description="raw label → genre, None = dropped")
    counts: dict[str, int] = Field(description="training-split counts after mapping")
    config: VocabConfig

    @classmethod
    def build(cls, genre_lists: Iterable[Iterable[str]], config: VocabConfig | None = None):
        config = config or VocabConfig()
        genre_lists = [set(genres) for genres in genre_lists]
        mapping: dict[str, str | None] = {
            label: None if label in config.drop else config.synonyms.get(label, label)
            for genres in genre_lists for label in genres
        }
        merged = _count(genre_lists, mapping)
        ranked = sorted(merged, key=lambda g: (-merged[g], g))
        floor = max(config.min_count, config.min_share * len(genre_lists))
        keep = [g for g in ranked[: config.top_n] if merged[g] >= floor and (config.keep is None or g in config.keep)]
        if config.fold_into_other and len(keep) < len(ranked):
            mapping = {k: (v if v in keep or v is None else OTHER) for k, v in mapping.items()}
        else:
            mapping = {k: (v if v in keep else None) for k, v in mapping.items()}
        counts = _count(genre_lists, mapping)
        genres = sorted(counts, key=lambda g: (-counts[g], g))
        return cls(genres=genres, mapping=mapping, counts=dict(counts), config=config)

    def map_genres(self, genres: Iterable[str]) -> list[str]:
        """Raw labels → vocabulary genres (deduplicated, in vocabulary order).

        A label never seen in training is folded into Other when the vocabulary has it,
        else dropped: unseen labels must not crash scoring of a newer catalogue.
        """
        fallback = OTHER if OTHER in self.genres else None
        targets = {self.mapping.get(g, fallback) for g in genres}
        return [g for g in self.genres if g in targets]

    def encode(self, genres: Iterable[str]) -> np.ndarray:
        """Multi-hot float32 vector over :attr:`genres`."""
        targets = set(self.map_genres(genres))
        return np.array([g in targets for g in self.genres], dtype=np.float32)

    def encode_many(self, genre_lists: Iterable[Iterable[str]]) -> np.ndarray:
        rows = [self.encode(genres) for genres in genre_lists]
        return np.stack(rows) if rows else np.zeros((0, len(self.genres)), np.float32)

    def save(self, path: str | Path | Location) -> None:
        Location.parse(path).write_text(self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: str | Path | Location) -> GenreVocabulary:
        return cls.model_validate(json.loads(Location.parse(path).read_text()))


def _count(genre_lists: list[set[str]], mapping: dict[str, str | None]) -> Counter[str]:
    """Posters per mapped genre: a poster labelled Music and Musical counts once."""
    return Counter(t for genres in genre_lists for t in {mapping[g] for g in genres} if t)


def training_genres(catalogue: str | Path | Location) -> list[list[str]]:
    """Genre lists of the labelled training split of a catalogue."""
    from posterfusion.features.catalogue import catalogue_files

    table = catalogue_files(catalogue).read(columns=["genres", "labelled", "split"])
    frame = table.to_pandas()
    frame = frame[frame["labelled"] & (frame["split"] == "train")]
    return [list(g) for g in frame["genres"]]
