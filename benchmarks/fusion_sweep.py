"""A validation-only sweep of fusion designs: which fused model is at least the CNN on every slice?

Each candidate (a recipe plus a partial configuration) trains once; every bundle is scored on the
*validation* split with its own Predictor, and each candidate is paired with the poster-only
``cnn`` bundle of the same recipe, per slice (with / without metadata, with / without detected
objects): the paired ROC-AUC difference (macro and 6 main genres) with its bootstrap interval.
Nothing here reads test labels; the test split and the MovieGenre slice are for the final table.

    python benchmarks/fusion_sweep.py --catalogue runs/q/catalogue --features runs/q/features \\
        --out runs/q/sweep --recipe frozen
    python benchmarks/fusion_sweep.py ... --candidate residual --candidate residual-layout

Bundles already in ``--out`` are reused, so a stopped sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CANDIDATES: dict[str, dict] = {
    "cnn": {"model": {"variant": "cnn"}},  # the reference every candidate is paired with
    "concat": {"model": {"variant": "fused", "fusion": "concat"}},
    "residual": {"model": {"variant": "fused", "fusion": "residual"}},
    "residual-fields": {"model": {"variant": "fused", "fusion": "residual"},
                        "optim": {"metadata_field_dropout": 0.2}},
    "residual-layout": {"model": {"variant": "fused", "fusion": "residual", "object_encoding": "layout"}},
    "cnn+metadata-residual": {"model": {"variant": "cnn+metadata", "fusion": "residual"}},
}


def train(args, name: str) -> Path:
    from posterfusion.jobs.train import format_train_summary, run_train
    from posterfusion.jobs.train.config import merge
    from posterfusion.jobs.train.recipes import resolve

    bundle = args.out / name
    if not (bundle / "model.safetensors").is_file():
        config = resolve(args.recipe, merge(CANDIDATES[name], {
            "data": {"catalogue": str(args.catalogue), "features": str(args.features)},
            "run": {"seed": args.seed, "out": str(bundle), "storage_path": str(args.out / "ray_results")}}))
        print(format_train_summary(run_train(config)), flush=True)
    return bundle


def judge(args, bundles: dict[str, Path]) -> dict:
    """Every candidate paired with ``cnn`` on the validation split, overall and per slice."""
    from posterfusion.jobs.evaluate import EvaluateConfig, Scorer, build_report, load_split_frame, model_scores
    from posterfusion.jobs.slices import detected_objects, slice_masks
    from posterfusion.models.bundle import load_bundle

    frame = load_split_frame(args.catalogue, "val")
    scorers = {name: Scorer(scores=model_scores(EvaluateConfig(model=path, catalogue=args.catalogue, out=args.out,
                                                               features=args.features), frame),
                            thresholds=load_bundle(path).thresholds) for name, path in bundles.items()}
    vocabulary = load_bundle(bundles["cnn"]).vocabulary
    pairs = [(name, "cnn") for name in bundles if name != "cnn"]
    return build_report(scorers, vocabulary.encode_many(frame["genres"]), vocabulary.genres, pairs, args.n_boot, 0,
                        slice_masks(frame, detected_objects(args.features, frame)))


def table(report: dict) -> list[str]:
    lines = [f"{'candidate − cnn':<28}{'slice':<18}{'posters':>8}  {'macro AUC':<26}{'6-main AUC':<26}"]
    blocks = {"all": {"posters": None, "paired": report["paired"]}} | report["slices"]
    for pair in report["paired"]:
        for name, block in blocks.items():
            if block.get("paired") is None:
                continue
            cells = [f"{r['diff']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]"
                     for r in (block["paired"][pair][m] for m in ("roc_auc_macro", "roc_auc_main6"))]
            lines.append(f"{pair:<28}{name:<18}{block['posters'] or '':>8}  {cells[0]:<26}{cells[1]:<26}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalogue", type=Path, required=True)
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipe", default="frozen")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-boot", type=int, default=500)
    parser.add_argument("--candidate", action="append", dest="candidates", choices=sorted(CANDIDATES))
    parser.add_argument("--address", default=None)
    args = parser.parse_args()
    names = ["cnn", *[n for n in (args.candidates or list(CANDIDATES)) if n != "cnn"]]

    from posterfusion.cluster import ClusterConfig, ray_cluster

    with ray_cluster(ClusterConfig(address=args.address)):
        bundles = {name: train(args, name) for name in names}
        report = judge(args, bundles)
    (args.out / "sweep.json").write_text(json.dumps(report, indent=2, default=float))
    print(f"\nvalidation split only (recipe {args.recipe}, seed {args.seed}); paired bootstrap 95 % intervals")
    print("\n".join(table(report)))


if __name__ == "__main__":
    main()
