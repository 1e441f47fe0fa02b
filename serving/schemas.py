"""Request and response shapes of the online API (typed, so bad input is named field by field)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class MovieMetadata(BaseModel):
    """Optional movie metadata sent with a poster. Every field may be left out (most posters have none).

    Ranges are those a real movie can have; anything else is a client bug answered 422, not
    a value to encode. The field names are the metadata encoder's (``features.metadata.INPUT_FIELDS``).
    """

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    year: int | None = Field(None, ge=1870, le=2100)
    runtime: float | None = Field(None, gt=0, le=1000, description="minutes")
    imdb_score: float | None = Field(None, ge=0, le=10)
    num_votes: int | None = Field(None, ge=0, le=100_000_000, description="IMDb's most-voted film has ~3 M")
    budget: float | None = Field(None, ge=0, le=1e10, description="US dollars")
    gross: float | None = Field(None, ge=0, le=1e11, description="US dollars")
    popularity: float | None = Field(None, ge=0, le=1e5, description="TMDb popularity")
    content_rating: str | None = Field(None, min_length=1, max_length=32)
    language: str | None = Field(None, min_length=1, max_length=64)
    country: str | None = Field(None, min_length=1, max_length=64)
    overview: str | None = Field(None, min_length=1, max_length=5000, description="the plot in a few sentences")


class GenreScore(BaseModel):
    genre: str
    probability: float


class ObjectCount(BaseModel):
    name: str
    count: int
    max_confidence: float


class PredictResponse(BaseModel):
    model_version: str
    probabilities: dict[str, float] = Field(description="one probability per genre")
    top3: list[GenreScore]
    genres: list[str] = Field(description="genres at or above their tuned threshold")
    objects: list[ObjectCount] = Field(description="detected objects, one entry per class")
    detections: list[dict] = Field(description="every detected box, corners normalised to [0, 1]")
    batch_size: int = Field(description="how many posters the model replica scored together with this one")
    model_ms: float = Field(description="milliseconds the model replica spent scoring that batch (the rest of the "
                            "latency is HTTP, validation, routing and queueing)")


class BatchResponse(BaseModel):
    model_version: str
    predictions: list[PredictResponse]


class GenresResponse(BaseModel):
    model_version: str
    variant: str
    detector: str | None
    genres: list[str]
    thresholds: dict[str, float]
