"""Contact sheets: per genre, the catalogue posters a model scores highest — what it "thinks" a genre looks like."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from posterfusion.locations import Location

# Contact sheet layout, in pixels: a label column, then one cell (thumbnail + caption) per poster.
THUMB_WIDTH, THUMB_HEIGHT = 96, 144
CAPTION_HEIGHT = 28
PAD = 6
LABEL_WIDTH = 150
CELL_WIDTH = THUMB_WIDTH + PAD
ROW_HEIGHT = THUMB_HEIGHT + CAPTION_HEIGHT + PAD


def contact_sheet_size(genres: int, per_genre: int) -> tuple[int, int]:
    """(width, height) in pixels of a sheet: fixed cells, so the size never depends on the posters."""
    return LABEL_WIDTH + per_genre * CELL_WIDTH, genres * ROW_HEIGHT


def contact_sheet(scores: pd.DataFrame | str | Path | Location, catalogue: str | Path | Location,
                  genres: list[str] | None, out_png: str | Path, per_genre: int = 6) -> Path:
    """PNG with one row per genre: the ``per_genre`` posters scored highest for it, with probabilities.

    ``scores`` is a frame of ``movie_id`` + one probability column per genre (batch scoring's
    output pivoted, or :func:`read_scores`), or an embeddings folder to read them from.
    ``genres=None`` draws every score column. Short rows (few posters) leave blank cells.
    """
    from posterfusion.models.similarity import read_scores

    frame = read_scores(scores) if isinstance(scores, str | Path | Location) else scores
    genres = list(genres) if genres is not None else [c for c in frame.columns if c != "movie_id"]
    missing = [g for g in genres if g not in frame.columns]
    if missing or "movie_id" not in frame.columns:
        raise ValueError(f"scores need movie_id and a column per genre; missing {missing or ['movie_id']}")
    picks = {g: frame[["movie_id", g]].dropna().nlargest(per_genre, g, keep="first") for g in genres}
    ids = sorted({str(m) for top in picks.values() for m in top["movie_id"]})
    posters = _catalogue_posters(catalogue, ids)
    sheet = _draw_sheet(genres, picks, posters, per_genre)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return out


def _catalogue_posters(catalogue: str | Path | Location, ids: list[str]) -> dict[str, bytes]:
    import pyarrow.compute as pc

    from posterfusion.features.catalogue import catalogue_files

    table = catalogue_files(catalogue).read(columns=["movie_id", "poster"], filter=pc.field("movie_id").isin(ids))
    return dict(zip(table["movie_id"].to_pylist(), table["poster"].to_pylist(), strict=True))


def _draw_sheet(genres: list[str], picks: dict[str, pd.DataFrame], posters: dict[str, bytes], per_genre: int):
    from PIL import Image, ImageDraw, ImageFont

    sheet = Image.new("RGB", contact_sheet_size(len(genres), per_genre), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for row, genre in enumerate(genres):
        top = row * ROW_HEIGHT
        best = picks[genre][genre].max() if len(picks[genre]) else float("nan")
        draw.text((PAD, top + PAD), genre, fill="black", font=font)
        draw.text((PAD, top + PAD + 16), f"top p {best:.2f}", fill="dimgray", font=font)
        for col, (movie_id, prob) in enumerate(zip(picks[genre]["movie_id"], picks[genre][genre], strict=True)):
            left = LABEL_WIDTH + col * CELL_WIDTH
            sheet.paste(_thumbnail(posters.get(str(movie_id))), (left, top + PAD // 2))
            caption_y = top + PAD // 2 + THUMB_HEIGHT + 2
            draw.text((left, caption_y), str(movie_id)[:16], fill="black", font=font)
            draw.text((left, caption_y + 12), f"p {prob:.2f}", fill="dimgray", font=font)
    return sheet


def _thumbnail(data: bytes | None):
    """The poster resized to the cell; a grey cell where it is missing or unreadable (the sheet still renders)."""
    from PIL import Image

    from posterfusion.features.catalogue import decode_rgb

    try:
        return decode_rgb(data).resize((THUMB_WIDTH, THUMB_HEIGHT), Image.Resampling.BILINEAR)
    except ValueError:
        return Image.new("RGB", (THUMB_WIDTH, THUMB_HEIGHT), "lightgray")
