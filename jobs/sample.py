"""``posterfusion sample``: a clearly synthetic poster set for the demo and fast tests.

Written in the Kaggle multi-label layout (``train.csv`` + ``Images/<Id>.jpg``) so it goes
through exactly the reader real data goes through, plus an IMDB-5000-layout metadata CSV.
Each genre has a visual cue (a tint and a motif) and a metadata tendency, so a model can
learn it in seconds; every poster says SYNTHETIC on it, and ids live in the unused
``tt9000xxxx`` range so they can never be mistaken for real titles.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pydantic import BaseModel, Field

# genre: (tint RGB, motif, share of posters, (runtime mean, log10 budget mean))
GENRE_CUES: dict[str, tuple[tuple[int, int, int], str, float, tuple[float, float]]] = {
    "Drama": ((40, 70, 160), "bars", 0.45, (118, 7.0)),
    "Comedy": ((235, 200, 40), "circles", 0.35, (98, 7.2)),
    "Action": ((230, 110, 20), "stripes", 0.22, (125, 7.9)),
    "Romance": ((240, 120, 170), "hearts", 0.18, (108, 7.1)),
    "Horror": ((120, 10, 20), "triangles", 0.12, (92, 6.6)),
    "Sci-Fi": ((20, 200, 210), "grid", 0.10, (120, 7.8)),
    "Animation": ((120, 220, 80), "squares", 0.09, (86, 7.8)),
    "Documentary": ((150, 150, 150), "bands", 0.08, (95, 6.0)),
}
WIDTH, HEIGHT = 180, 267


class SampleConfig(BaseModel):
    out: Path
    n: int = Field(400, ge=1, description="labelled posters")
    unlabelled: int = Field(40, ge=0, description="posters without a label row")
    seed: int = 0
    metadata_fraction: float = Field(0.6, ge=0, le=1, description="ids given metadata")


def draw_genres(genres: list[str], rng: np.random.Generator) -> Image.Image:
    """A poster whose tint is the mean of its genres' tints, with each genre's motif on it."""
    tint = np.mean([GENRE_CUES[g][0] for g in genres], axis=0)
    noise = rng.normal(0, 18, size=(HEIGHT, WIDTH, 3))
    image = Image.fromarray(np.clip(tint * 0.6 + 40 + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for genre in genres:
        _MOTIFS[GENRE_CUES[genre][1]](draw, GENRE_CUES[genre][0], rng)
    draw.rectangle([0, HEIGHT - 22, WIDTH, HEIGHT], fill=(0, 0, 0))
    draw.text((8, HEIGHT - 18), "SYNTHETIC SAMPLE", fill=(255, 255, 255))
    return image


def _bars(draw, color, rng):
    for x in rng.integers(0, WIDTH, 4):
        draw.rectangle([x, 20, x + 8, HEIGHT - 40], fill=color)


def _circles(draw, color, rng):
    for _ in range(5):
        x, y, r = rng.integers(10, WIDTH - 10), rng.integers(10, HEIGHT - 40), rng.integers(8, 22)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=color, outline=(0, 0, 0))


def _stripes(draw, color, rng):
    offset = int(rng.integers(0, 40))
    for k in range(-HEIGHT, WIDTH, 40):
        draw.line([(k + offset, HEIGHT), (k + offset + HEIGHT, 0)], fill=color, width=7)


def _hearts(draw, color, rng):
    for _ in range(4):
        x, y = rng.integers(20, WIDTH - 20), rng.integers(20, HEIGHT - 50)
        draw.ellipse([x - 10, y - 6, x, y + 4], fill=color)
        draw.ellipse([x, y - 6, x + 10, y + 4], fill=color)
        draw.polygon([(x - 10, y), (x + 10, y), (x, y + 14)], fill=color)


def _triangles(draw, color, rng):
    for _ in range(4):
        x, y = rng.integers(0, WIDTH), rng.integers(0, HEIGHT - 40)
        draw.polygon([(x, y), (x + 24, y + 40), (x - 24, y + 40)], fill=(5, 5, 5), outline=color)


def _grid(draw, color, rng):
    step = int(rng.integers(18, 26))
    for x in range(0, WIDTH, step):
        draw.line([(x, 0), (x, HEIGHT)], fill=color, width=1)
    for y in range(0, HEIGHT, step):
        draw.line([(0, y), (WIDTH, y)], fill=color, width=1)


def _squares(draw, color, rng):
    for _ in range(12):
        x, y = rng.integers(0, WIDTH - 12), rng.integers(0, HEIGHT - 40)
        rgb = tuple(int(v) for v in rng.integers(60, 255, 3))
        draw.rectangle([x, y, x + 12, y + 12], fill=rgb, outline=color)


def _bands(draw, color, rng):
    for y in range(int(rng.integers(0, 20)), HEIGHT - 30, 34):
        draw.rectangle([0, y, WIDTH, y + 10], fill=color)


_MOTIFS = {"bars": _bars, "circles": _circles, "stripes": _stripes, "hearts": _hearts,
           "triangles": _triangles, "grid": _grid, "squares": _squares, "bands": _bands}


def draw_labels(rng: np.random.Generator) -> list[str]:
    """1–3 genres, each drawn by its share; never empty."""
    names = list(GENRE_CUES)
    shares = np.array([GENRE_CUES[g][2] for g in names])
    chosen = [g for g, p in zip(names, shares, strict=True) if rng.random() < p][:3]
    return chosen or [names[int(rng.choice(len(names), p=shares / shares.sum()))]]


def _metadata_row(movie_id: str, genres: list[str], rng: np.random.Generator) -> dict:
    runtime = np.mean([GENRE_CUES[g][3][0] for g in genres]) + rng.normal(0, 8)
    budget = 10 ** (np.mean([GENRE_CUES[g][3][1] for g in genres]) + rng.normal(0, 0.3))
    return {
        "movie_title": f"Synthetic {movie_id}", "title_year": int(rng.integers(1970, 2017)),
        "duration": round(float(runtime)), "imdb_score": round(float(rng.uniform(4, 8.5)), 1),
        "num_voted_users": int(10 ** rng.uniform(2, 6)), "budget": int(budget),
        "gross": int(budget * rng.uniform(0.2, 3)), "content_rating": "R" if "Horror" in genres else "PG-13",
        "language": "English", "country": "USA",
        "movie_imdb_link": f"http://www.imdb.com/title/{movie_id}/",
    }


def write_sample(config: SampleConfig) -> dict:
    """Write the sample; return a summary (counts per genre, paths)."""
    rng = np.random.default_rng(config.seed)
    images = config.out / "Images"
    images.mkdir(parents=True, exist_ok=True)
    names = list(GENRE_CUES)
    digits = max(4, math.ceil(math.log10(config.n + config.unlabelled + 1)))
    label_rows, meta_rows = [], []
    for i in range(config.n + config.unlabelled):
        movie_id = f"tt9000{i:0{digits}d}"
        genres = draw_labels(rng)
        draw_genres(genres, rng).save(images / f"{movie_id}.jpg", quality=88)
        if i < config.n:
            label_rows.append([movie_id, str(genres)] + [int(g in genres) for g in names])
        if rng.random() < config.metadata_fraction:
            meta_rows.append(_metadata_row(movie_id, genres, rng))
    with open(config.out / "train.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["Id", "Genre", *names], *label_rows])
    metadata = config.out / "metadata_imdb5000.csv"
    with open(metadata, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(meta_rows[0]) if meta_rows else ["movie_imdb_link"])
        writer.writeheader()
        writer.writerows(meta_rows)
    counts = {g: sum(row[2 + k] for row in label_rows) for k, g in enumerate(names)}
    return {"out": str(config.out), "labelled": config.n, "unlabelled": config.unlabelled,
            "metadata_rows": len(meta_rows), "metadata": str(metadata), "genres": counts}
