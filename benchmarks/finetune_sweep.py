"""A validation-only sweep of the fine-tuning phase of a recipe, over several seeds.

How the ``quality`` recipe's settings are chosen without looking at the test split: each
candidate (the recipe plus a few overrides) trains the ``fused`` variant on every seed, and
the table prints what training itself measured on the *validation* split — the best epoch's
macro ROC-AUC (what early stopping keeps), the calibrated 6-main-genre AUC and hit@3, the best
epoch and the phase it came from — with the mean over seeds. Nothing here reads test labels.

    python benchmarks/finetune_sweep.py --catalogue runs/quality/catalogue --features runs/quality/features \
        --out runs/sweep --seed 0 --seed 1 --seed 2
    python benchmarks/finetune_sweep.py ... --candidate restart-1e-3 --candidate head-2e-4

How a candidate is chosen: the highest mean of the early-stopping metric (validation macro
ROC-AUC); within 0.002 of each other, the one better on the ranking metrics users see
(validation hit@3, top-n, 6-main AUC) on most seeds.

Bundles already in ``--out`` are reused, so a stopped sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# Candidate overrides (partial training configurations) of the recipe's fine-tuning phase (the head
# warm-up is shared by all); the single-network candidates set combine.members 1.
ONE = {"combine": {"members": 1}}
CANDIDATES: dict[str, dict] = {
    # the head restarts at its warm-up peak (1e-3) when the backbone starts training: the recipe until 2026-12-02
    "restart-1e-3": {"optim": {"finetune_head_lr": 1e-3}} | ONE,
    # the head, already trained on frozen features, continues at the backbone's rate: the recipe since
    "head-2e-4": {"optim": {"finetune_head_lr": 2e-4}} | ONE,
    # ... and the backbone moves half as fast
    "head-1e-4-bb-1e-4": {"optim": {"finetune_head_lr": 1e-4, "backbone_lr": 1e-4}} | ONE,
    # two fine-tuning runs from one warm-up, greedily averaged: its members print beside it (paired)
    "soup-2": {"combine": {"members": 2, "method": "soup"}},
    # ... kept side by side, their logits averaged (an output ensemble sharing the frozen stages)
    "ensemble-2": {"combine": {"members": 2, "method": "ensemble"}},
    "ensemble-3": {"combine": {"members": 3, "method": "ensemble"}},
}


def train_candidate(args, name: str, seed: int) -> dict:
    """Train (or reuse) one candidate on one seed; return the bundle's recorded training metrics."""
    from posterfusion.jobs.train import format_train_summary, run_train
    from posterfusion.jobs.train.config import merge
    from posterfusion.jobs.train.recipes import resolve
    from posterfusion.models.bundle import load_bundle

    bundle = args.out / f"{name}-s{seed}"
    if not (bundle / "metrics.json").is_file():
        config = resolve(args.recipe, merge(CANDIDATES[name], {
            "model": {"variant": args.variant}, "data": {"catalogue": str(args.catalogue),
                                                         "features": str(args.features)},
            "run": {"seed": seed, "out": str(bundle), "storage_path": str(args.out / "ray_results")}}))
        print(format_train_summary(run_train(config)), flush=True)
    return load_bundle(bundle).metrics()


def row(name: str, seed: int | str, metrics: dict) -> str:
    best, val = metrics["best"], metrics["validation"]["model"]
    return (f"{name:<20} {seed!s:>4}  {best['val_macro_auc']:.4f}  {val['roc_auc_main6']:.4f}  {val['hit@3']:.3f}"
            f"  {val['top_n_ratio']:.3f}  {best['epoch']!s:>2}/{metrics['history'][-1]['epoch']:<2}"
            f" {best['phase']:<5} {metrics['seconds']:>6.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalogue", type=Path, required=True)
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipe", default="quality")
    parser.add_argument("--variant", default="fused")
    parser.add_argument("--seed", type=int, action="append", dest="seeds")
    parser.add_argument("--candidate", action="append", dest="candidates", choices=sorted(CANDIDATES))
    parser.add_argument("--address", default=None)
    args = parser.parse_args()
    seeds, names = args.seeds or [0, 1], args.candidates or list(CANDIDATES)

    from posterfusion.cluster import ClusterConfig, ray_cluster

    results: dict[str, list[dict]] = {name: [] for name in names}
    with ray_cluster(ClusterConfig(address=args.address)):
        for seed in seeds:  # seed-major: every candidate has as many seeds as any other when stopped early
            for name in names:
                results[name].append(train_candidate(args, name, seed))
    print(f"\nvalidation split only ({args.variant}, recipe {args.recipe} + overrides)")
    print(f"{'candidate':<20} {'seed':>4}  macro   main6   hit@3  top-n  best  phase {'train s':>7}")
    for name in names:
        for seed, metrics in zip(seeds, results[name], strict=True):
            print(row(name, seed, metrics))
            for member in metrics.get("members", {}).get("runs", []):
                print(row(f"  member {member['seed']}", seed, member | {"seconds": 0}))
        mean = {k: sum(m["validation"]["model"][k] for m in results[name]) / len(seeds)
                for k in ("roc_auc_main6", "hit@3", "top_n_ratio")}
        macro = sum(m["best"]["val_macro_auc"] for m in results[name]) / len(seeds)
        print(f"{name:<20} mean  {macro:.4f}  {mean['roc_auc_main6']:.4f}  {mean['hit@3']:.3f}  "
              f"{mean['top_n_ratio']:.3f}")


if __name__ == "__main__":
    main()
