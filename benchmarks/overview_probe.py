"""Does a poster's overview carry genre evidence a bundle does not read? A validation-only probe.

The catalogue keeps TMDb's plot text (``overview``) beside the structured metadata; before the
metadata encoder read it, no model did. This probe asks, before any plumbing or retraining,
whether validation supports reading it:

* a TF-IDF vocabulary of the training split's overviews (the encoder's own
  :class:`~posterfusion.features.metadata.TextVocabulary`, ``--words`` of them) and one logistic
  model per genre on those weights alone, trained on the training split's posters with an overview;
* a bundle's calibrated probabilities on the **validation** split, its logits plus ``w`` × the
  text model's (its intercept left out: text evidence only, 0 without an overview), ``w`` in
  0, ¼, ½, 1; macro ROC-AUC and the six main genres on the posters with an overview, with metadata,
  and all, with the paired bootstrap gain over the bundle alone. Nothing reads the test split.

    python benchmarks/overview_probe.py --catalogue runs/q/catalogue --features runs/q/features \\
        --model runs/q/models-notext/quality/fused-s0
"""

from __future__ import annotations

import argparse

import numpy as np

WEIGHTS = (0.0, 0.25, 0.5, 1.0)


def text_logits(catalogue, frame, genres: list[str], words: int) -> tuple[np.ndarray, np.ndarray]:
    """(the text models' logits for ``frame``'s rows without their intercepts, which rows have an overview)."""
    from sklearn.linear_model import LogisticRegression

    from posterfusion.features.catalogue import catalogue_files
    from posterfusion.features.metadata import TextVocabulary

    table = catalogue_files(catalogue).read(["movie_id", "split", "labelled", "genres", "overview"]).to_pandas()
    train = table[table["labelled"] & (table["split"] == "train") & table["overview"].notna()]
    vocabulary = TextVocabulary.fit(train["overview"], words)
    x = vocabulary.transform(train["overview"])
    y = np.array([[genre in set(g) for genre in genres] for g in train["genres"]])
    has = frame["overview"].notna().to_numpy()
    xv = vocabulary.transform(frame["overview"].where(has, ""))
    logits = np.zeros((len(frame), len(genres)))
    for j in range(len(genres)):
        if 0 < y[:, j].sum() < len(y):
            model = LogisticRegression(C=4.0, max_iter=2000).fit(x, y[:, j])
            logits[:, j] = xv @ model.coef_[0]
    return logits * has[:, None], has


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--catalogue", required=True)
    parser.add_argument("--features", help="cached object features (else the detector runs)")
    parser.add_argument("--model", required=True, help="a bundle reading no overview")
    parser.add_argument("--words", type=int, default=2000)
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args()

    from posterfusion.cluster import prepare_environment, ray_cluster
    from posterfusion.jobs.evaluate import EvaluateConfig, encode_labels, label_space, load_split_frame, model_scores
    from posterfusion.locations import Location
    from posterfusion.models.bundle import load_bundle
    from posterfusion.models.metrics import macro_auc, main_genre_auc, paired_bootstrap

    prepare_environment()
    catalogue, model = Location.parse(args.catalogue), Location.parse(args.model)
    bundle = load_bundle(model)
    with ray_cluster():
        frame = load_split_frame(catalogue, "val")
        scores = model_scores(EvaluateConfig(model=model, catalogue=catalogue, out=model,
                                             features=Location.parse(args.features) if args.features else None), frame)
    labels = encode_labels(bundle.vocabulary, frame, label_space(bundle.vocabulary, frame, same_source=True))
    text, has = text_logits(catalogue, frame, bundle.genres, args.words)
    present = frame["has_metadata"].to_numpy(dtype=bool)
    clipped = np.clip(scores.astype(np.float64), 1e-7, 1 - 1e-7)
    logits = np.log(clipped) - np.log1p(-clipped)
    six = main_genre_auc(bundle.genres)
    print(f"overview probe: {model}, validation {len(frame)} posters ({has.sum()} with an overview, "
          f"{present.sum()} with metadata), {args.words} words")
    for weight in WEIGHTS:
        mixed = logits + weight * text
        gain = paired_bootstrap(labels[has], mixed[has], logits[has], macro_auc, n_boot=args.n_boot)
        print(f"  w={weight:<4g} with an overview: macro {macro_auc(labels[has], mixed[has]):.4f} "
              f"({gain['diff']:+.4f} [{gain['low']:+.4f}, {gain['high']:+.4f}]), 6-main "
              f"{six(labels[has], mixed[has]):.4f}; with metadata 6-main {six(labels[present], mixed[present]):.4f}; "
              f"all: macro {macro_auc(labels, mixed):.4f}, 6-main {six(labels, mixed):.4f}")


if __name__ == "__main__":
    main()
