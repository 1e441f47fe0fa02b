"""``posterfusion compare``: variants, recipes and seeds side by side, on the same test posters.

An *entry* is one trained bundle: a recipe (``quality``, ``seed-densenet``, …), a variant
(``cnn``, ``cnn+objects``, ``cnn+metadata``, ``fused``, ``flags-only``) and a seed. Compare
trains the entries that have no bundle yet (``MODELS/<recipe>/<variant>-s<seed>``), retrains —
and says so — a bundle trained with other settings or on another catalogue (it would be
silently stale; settings newer than a bundle count at their defaults, so old bundles stay),
routes, with ``--route-by-metadata``, each variant reading metadata with the same seed's ``cnn``
(:mod:`posterfusion.jobs.route`: one bundle, each slice scored by the network validation chose),
scores every entry on the same test posters with its own calibration and thresholds, and writes
one report: ``report.md``/``.html``, ``metrics.json`` and plots.

Entries that share a genre vocabulary are compared with each other and with the label prior and
classic baseline of that vocabulary, with paired bootstrap differences (each variant − ``cnn``,
``fused`` − ``cnn+metadata``, ``cnn+metadata`` − ``flags-only``, ``flags-only`` − ``cnn``, each
within one recipe and seed; and the first recipe named − each other recipe, variant for variant
and seed for seed). Seed recipes with a vocabulary of their own (the six main genres,
rare genres folded) form groups of their own; one table puts every entry side by side on its
own vocabulary (beside its own label prior) and on the six main genres all vocabularies share.
With several seeds, each metric's spread across seeds stands beside the bootstrap intervals.
"""

from __future__ import annotations

import html
import json
import time

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from posterfusion.features.catalogue import catalogue_identity
from posterfusion.jobs.evaluate import (
    EvaluateConfig,
    Scorer,
    baseline_scorers,
    build_report,
    encode_labels,
    json_default,
    label_space,
    load_split_frame,
    model_scores,
    poster_statistics,
    restrict,
    summary_table,
)
from posterfusion.jobs.slices import detected_objects, slice_masks, slice_tables
from posterfusion.jobs.tracking import tracked
from posterfusion.jobs.train import TrainConfig, format_train_summary, run_train
from posterfusion.jobs.train.config import flat, merge
from posterfusion.jobs.train.recipes import get_recipe, resolve
from posterfusion.locations import Location
from posterfusion.models.bundle import FORMAT_VERSION, Bundle, bundle_exists, load_bundle
from posterfusion.models.fusion import VARIANTS, Variant
from posterfusion.models.metrics import HEADLINE

PAIRS = [("fused", "cnn"), ("cnn+objects", "cnn"), ("cnn+metadata", "cnn"), ("fused", "cnn+metadata"),
         ("cnn+metadata", "flags-only"), ("flags-only", "cnn")]
OBJECT_VARIANTS = [name for name, spec in VARIANTS.items() if spec.objects]
# the side-by-side table leaves out the two headline metrics a reader needs least to rank the entries
SIDE_BY_SIDE = [m for m in HEADLINE if m not in ("roc_auc_micro", "f1_micro@0.5")]


class CompareConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    catalogue: Location
    out: Location = Field(description="report folder: a local path or a URI")
    models: Location = Field(description="bundles live (or are trained) in MODELS/<recipe>/<variant>-s<seed> "
                             "(a path or a URI)")
    recipes: list[str] = Field(default_factory=lambda: ["quality"])
    variants: list[Variant] | None = Field(None, description="default: each recipe's own variant")
    seeds: list[int] = Field(default_factory=lambda: [0])
    features: Location | None = None
    train: dict = Field(default_factory=dict, description="a partial training configuration (--set) for every "
                        "entry trained here")
    from_scratch: bool = Field(False, description="train without the recipes' pretrained weights")
    poster_from_cnn: bool = Field(False, description="every variant with side inputs keeps the same recipe and "
                                  "seed's `cnn` bundle as its poster path (model.poster_from; trained after it, "
                                  "in MODELS/<recipe>/<variant>_on_cnn-s<seed>): without side inputs it ranks "
                                  "exactly as `cnn`")
    route_by_metadata: bool = Field(False, description="every variant that reads metadata is scored as a routed "
                                    "bundle (`posterfusion route`): its own bundle where validation shows it "
                                    "better than the same recipe and seed's `cnn` bundle, that cnn bundle elsewhere "
                                    "(in MODELS/<recipe>/<variant>_routed-s<seed>)")
    split: str = "test"
    on: Location | None = Field(None, description="score the entries on another labelled catalogue (another "
                                "source; with split 'all'), on the genres both sides know; default: --catalogue")
    n_boot: int = Field(1000, ge=0)
    seed: int = Field(0, description="bootstrap seed")

    @field_validator("train")
    @classmethod
    def _known_settings(cls, value: dict) -> dict:
        TrainConfig.model_validate(value)  # names and values checked now, not an hour into the run
        return value

    @model_validator(mode="after")
    def _kept_poster_path_needs_cnn(self) -> CompareConfig:
        if self.poster_from_cnn and "cnn" not in (self.variants or []):
            raise ValueError("--poster-from-cnn keeps the cnn bundle's poster path: name --variant cnn too")
        if self.route_by_metadata and "cnn" not in (self.variants or []):
            raise ValueError("--route-by-metadata routes between each variant and the cnn bundle: name --variant "
                             "cnn too")
        if self.route_by_metadata and self.poster_from_cnn:
            raise ValueError("choose one of --poster-from-cnn and --route-by-metadata")
        return self

    def routed(self, variant: str) -> bool:
        """Whether ``variant``'s entries are routed bundles."""
        return self.route_by_metadata and VARIANTS[variant].metadata != "none"


class Entry(BaseModel):
    recipe: str
    variant: str
    seed: int
    name: str
    bundle: Location
    source: Location | None = Field(None, description="a routed entry's own trained bundle (routed with the cnn's)")


def entries(config: CompareConfig) -> list[Entry]:
    """Every (recipe, variant, seed), named by what varies between them."""
    out = []
    for recipe in config.recipes:
        variants = config.variants or [get_recipe(recipe).resolved().model.variant]
        cnn_first = config.poster_from_cnn or config.route_by_metadata
        for variant in sorted(variants, key=lambda v: v != "cnn") if cnn_first else variants:
            for seed in config.seeds:
                parts = [recipe] * (len(config.recipes) > 1) + [variant] + [f"s{seed}"] * (len(config.seeds) > 1)
                routed = config.routed(variant)
                out.append(Entry(recipe=recipe, variant=variant, seed=seed, name="/".join(parts),
                                 bundle=bundle_path(config, recipe, variant, seed, routed=routed),
                                 source=bundle_path(config, recipe, variant, seed) if routed else None))
    return out


def bundle_path(config: CompareConfig, recipe: str, variant: str, seed: int, routed: bool = False) -> Location:
    """A bundle of an entry: ``MODELS/<recipe>/<variant>-s<seed>``, ``_on_cnn`` added to the variant where its
    poster path is the cnn bundle's, ``_routed`` to a routed bundle's (the one trained is the plain name)."""
    name = variant.replace("+", "_") + ("_on_cnn" if config.poster_from_cnn and variant != "cnn" else "")
    name += "_routed" if routed else ""
    return config.models / recipe / f"{name}-s{seed}"


def entry_config(config: CompareConfig, entry: Entry) -> TrainConfig:
    """The training configuration of one entry: its recipe, the shared overrides, its variant and seed."""
    features = str(config.features) if config.features and VARIANTS[entry.variant].objects else None
    kept = config.poster_from_cnn and entry.variant != "cnn"
    poster = {"poster_from": str(bundle_path(config, entry.recipe, "cnn", entry.seed))} if kept else {}
    own = {"model": {"variant": entry.variant, **poster},
           "data": {"catalogue": str(config.catalogue), "features": features},
           "run": {"seed": entry.seed, "out": str(entry.source or entry.bundle),
                   "storage_path": str(config.models / "ray_results")}}
    return resolve(entry.recipe, merge(config.train, own), from_scratch=config.from_scratch)


def check_entries(config: CompareConfig) -> list[TrainConfig]:
    """Every entry's configuration, resolved (weights found, settings valid) before anything trains."""
    configs = [entry_config(config, entry) for entry in entries(config)]
    for train in configs:
        train.check_ready()
    return configs


# what an entry's bundle may differ in and still be the same model
IGNORED = ("run.out", "run.storage_path", "data.cache", "notes")


def stale_reason(bundle: Bundle, train: TrainConfig) -> str | None:
    """Why an existing bundle is not what ``train`` would make now (None: it is)."""
    if bundle.config.format_version < FORMAT_VERSION:
        return f"written in bundle format {bundle.config.format_version} (now {FORMAT_VERSION})"
    now = flat(train.model_dump(mode="json"))
    # a setting newer than the bundle was, when it was trained, at its default
    then = flat(TrainConfig().model_dump(mode="json")) | flat(bundle.config.train)
    unread = () if train.model.text_words else ("model.metadata_text",)  # a variant reading no overview
    changed = sorted(k for k in now if not k.startswith(IGNORED + unread) and then.get(k) != now[k])
    if changed:
        return f"trained with other settings ({', '.join(changed)})"
    model = bundle.config.model
    if (model.fusion == "residual" and (model.uses_objects or model.uses_metadata) and model.correction_scale is None
            and set(train.optim.correction_scales) != {1.0}):
        return "its side corrections were never weighed on validation (trained before optim.correction_scales)"
    if model.poster_from and not (bundle_exists(model.poster_from)
                                  and load_bundle(model.poster_from).version == model.poster_version):
        return f"the cnn bundle whose poster path it keeps ({model.poster_from}) was retrained since"
    if bundle.config.catalogue.get("fingerprint") != catalogue_identity(train.data.catalogue)["fingerprint"]:
        return "trained on another catalogue (or an older version of this one)"
    return None


def ensure_bundles(config: CompareConfig) -> list[Entry]:
    """Train the entries without a bundle, and retrain stale ones (saying why)."""
    todo = entries(config)
    for entry, train in zip(todo, check_entries(config), strict=True):
        trained = entry.source or entry.bundle
        if bundle_exists(trained):
            reason = stale_reason(load_bundle(trained), train)
            if reason is None:
                continue
            print(f"[compare] {trained} is stale: {reason}; retraining it", flush=True)
        summary = run_train(train)
        print("[compare] " + format_train_summary(summary).replace("\n", "\n[compare] "), flush=True)
    for entry in todo:
        if entry.source is not None:
            ensure_routed(config, entry)
    return todo


def ensure_routed(config: CompareConfig, entry: Entry) -> None:
    """Route a routed entry's bundle from its own and the cnn's, unless one routed from both as they are now exists."""
    from posterfusion.jobs.route import RouteConfig, format_route_summary, run_route

    cnn = bundle_path(config, entry.recipe, "cnn", entry.seed)
    if bundle_exists(entry.bundle):
        routing = load_bundle(entry.bundle).config.model.routing  # None: a plain bundle where a routed one belongs
        if routing and all(routing.sources[name]["version"] == load_bundle(where).version
                           for name, where in (("cnn", cnn), ("side", entry.source))):
            return
        print(f"[compare] {entry.bundle} is stale: not routed from the bundles as they are now; routing again",
              flush=True)
    summary = run_route(RouteConfig(cnn=cnn, side=entry.source, out=entry.bundle, catalogue=config.catalogue,
                                    features=config.features))
    print("[compare] " + format_route_summary(summary).replace("\n", "\n[compare] "), flush=True)


def run_compare(config: CompareConfig) -> dict:
    """Train what is missing, score every entry and the baselines on one split, write the report.

    One MLflow parent run (:mod:`posterfusion.jobs.tracking`) holds it all: the trainings nest under
    it, and each vocabulary group's point values, paired differences, slices and the report files are
    its own.
    """
    with tracked("compare", f"compare {'+'.join(config.recipes)}", config.model_dump(mode="json"),
                 {"posterfusion.report": str(config.out)}) as run:
        result = _compare(config)
        for i, group in enumerate(result["groups"]):
            run.report(group, config.out, [] if i else COMPARE_FILES, prefix=f"group{i}." if i else "")
    return result


COMPARE_FILES = ["report.md", "report.html", "metrics.json", "per_genre_auc.png", "pr_curves.png",
                 "reliability.png", "contact_sheet.png"]


def _compare(config: CompareConfig) -> dict:
    started = time.perf_counter()
    todo = ensure_bundles(config)
    scored_on = config.on or config.catalogue  # the entries always train on --catalogue
    frame = load_split_frame(scored_on, config.split)
    masks = slice_masks(frame, detected_objects(config.features, frame))
    stats = poster_statistics(config.catalogue, scored_on, frame)
    bundles = {entry.name: load_bundle(entry.bundle) for entry in todo}
    groups: dict[tuple, list[Entry]] = {}
    for entry in todo:
        groups.setdefault(tuple(bundles[entry.name].genres), []).append(entry)
    reports = []
    for members in groups.values():
        vocabulary = bundles[members[0].name].vocabulary
        scorers = {e.name: Scorer(scores=model_scores(EvaluateConfig(model=e.bundle, catalogue=scored_on,
                                                                     out=config.out, features=config.features), frame),
                                  thresholds=bundles[e.name].thresholds) for e in members}
        scorers |= baseline_scorers(config.catalogue, vocabulary, frame, stats)
        space = label_space(vocabulary, frame, same_source=config.on is None)
        scorers = {name: restrict(s, space.columns) for name, s in scorers.items()}
        labels = encode_labels(vocabulary, frame, space)
        report = build_report(scorers, labels, space.genres, paired_differences(members), config.n_boot,
                              config.seed, masks)
        report["label_space"] = space.model_dump()
        report |= {"entries": [e.model_dump(mode="json") for e in members], "seed_spread": seed_spread(report, members)}
        reports.append((report, scorers, labels))
    result = {"split": config.split, "posters": len(frame), "groups": [r for r, _, _ in reports],
              "side_by_side": side_by_side([r for r, _, _ in reports]),
              "seconds": round(time.perf_counter() - started, 1)}
    write_compare(config, result, reports, frame)
    return result


def paired_differences(members: list[Entry]) -> list[tuple[str, str]]:
    """(a, b) names of the differences worth a paired bootstrap.

    Within one recipe and seed, each PAIRS difference available. Across recipes, the first recipe
    named against each other one, variant for variant and seed for seed: ``--recipe quality
    --recipe frozen`` asks whether fine-tuning beat the frozen backbone, poster for poster.
    """
    by_key = {(e.recipe, e.seed, e.variant): e.name for e in members}
    runs = sorted({(recipe, seed) for recipe, seed, _ in by_key})
    within = [(by_key[(r, s, a)], by_key[(r, s, b)]) for r, s in runs for a, b in PAIRS
              if (r, s, a) in by_key and (r, s, b) in by_key]
    first = members[0].recipe if members else None
    across = [(by_key[(first, e.seed, e.variant)], e.name) for e in members
              if e.recipe != first and (first, e.seed, e.variant) in by_key]
    return within + across


def seed_spread(report: dict, members: list[Entry]) -> dict:
    """Per (recipe, variant) with several seeds: each headline metric's mean and range over the seeds."""
    out = {}
    for key in sorted({(e.recipe, e.variant) for e in members}):
        names = [e.name for e in members if (e.recipe, e.variant) == key]
        if len(names) < 2:
            continue
        values = {m: [report["intervals"][n][m][0] for n in names] for m in report["intervals"][names[0]]}
        out[f"{key[0]}/{key[1]}"] = {m: {"mean": float(np.mean(v)), "range": float(np.ptp(v)), "seeds": len(v)}
                                     for m, v in values.items()}
    return out


def side_by_side(groups: list[dict]) -> list[dict]:
    """One row per entry (and per group's label prior): point metrics on its own vocabulary + the main genres."""
    rows = []
    for group in groups:
        names = [e["name"] for e in group["entries"]] + ["label_prior"]
        for name in names:
            row = {"entry": name, "genres": len(group["genres"])}
            row |= {m: group["intervals"][name][m][0] for m in SIDE_BY_SIDE}
            rows.append(row)
    return rows


def verdicts(report: dict) -> list[str]:
    """Plain sentences: is each paired difference significant?"""
    lines = []
    for pair, by_metric in report["paired"].items():
        for metric, result in by_metric.items():
            status = "significant" if result["significant"] else "NOT significant"
            p = f"p < {1 / result['n_used']:.3g}" if result["p_value"] == 0 else f"p = {result['p_value']:.3f}"
            lines.append(f"{pair}, {metric}: {result['diff']:+.4f} [{result['low']:+.4f}, {result['high']:+.4f}], "
                         f"{p} — {status} at 95 %.")
    return lines


def per_genre_table(report: dict, pair: str) -> list[str]:
    """Markdown: one pair's ROC-AUC difference per genre with its paired interval — where a side input helps
    (the interval above 0), where it hurts (below), and where the test cannot tell."""
    block = report.get("paired_per_genre", {}).get(pair)
    if block is None:
        return []
    lines = ["", f"Per genre, {pair} (ROC-AUC, paired 95 % interval):", "", "| genre | difference | verdict |",
             "|---|---|---|"]
    for genre, diff, low, high in zip(report["genres"], block["diff"], block["low"], block["high"], strict=True):
        if diff is None or not np.isfinite(diff):
            lines.append(f"| {genre} | n/a | no positives |")
            continue
        verdict = "helps" if low > 0 else "hurts" if high < 0 else "not significant"
        lines.append(f"| {genre} | {diff:+.3f} [{low:+.3f}, {high:+.3f}] | {verdict} |")
    return lines


def side_by_side_table(rows: list[dict]) -> str:
    header = "| entry | genres | " + " | ".join(SIDE_BY_SIDE) + " |"
    lines = [header, "|---" * (len(SIDE_BY_SIDE) + 2) + "|"]
    for row in rows:
        cells = ["n/a" if row[m] is None or not np.isfinite(row[m]) else f"{row[m]:.3f}" for m in SIDE_BY_SIDE]
        lines.append(f"| {row['entry']} | {row['genres']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(result: dict, plots: list[str]) -> str:
    parts = ["# Comparison", "", f"Split `{result['split']}`, {result['posters']} posters.", "",
             "## Side by side (point values; each entry on its own vocabulary, beside its own label prior)", "",
             side_by_side_table(result["side_by_side"])]
    for i, group in enumerate(result["groups"], 1):
        parts += ["", f"## Group {i}: {len(group['genres'])} genres", "", summary_table(group | {
            "split": result["split"], "posters": result["posters"]})]
        parts += slice_tables(group | {"split": result["split"]}, summary_table)
        if group["seed_spread"]:
            parts += ["", "Spread across seeds (max − min of the point value):", ""]
            parts += [f"- {k}: " + ", ".join(f"{m} {v['range']:.3f}" for m, v in by.items())
                      for k, by in group["seed_spread"].items()]
        parts += ["", "Paired differences:", ""] + ([f"- {line}" for line in verdicts(group)] or ["- none"])
        for pair in group.get("paired_per_genre", {}):  # where objects help or hurt: the pairs that add them
            if any(variant in pair.split(" - ")[0] for variant in OBJECT_VARIANTS):
                parts += per_genre_table(group, pair)
    parts += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(parts) + "\n"


def html_page(result: dict, plots: list[str]) -> str:
    rows = [line.strip("|").split("|") for line in side_by_side_table(result["side_by_side"]).splitlines()]
    header, body = rows[0], rows[2:]
    table = "<table><tr>" + "".join(f"<th>{html.escape(c.strip())}</th>" for c in header) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>" for r in body) + "</table>"
    items = "".join(f"<li>{html.escape(v)}</li>" for g in result["groups"] for v in verdicts(g))
    images = "".join(f'<figure><img src="{p}" alt="{p}"><figcaption>{p}</figcaption></figure>' for p in plots)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>posterfusion comparison</title>"
            f"<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}td,th{{padding:4px 8px;"
            f"border-bottom:1px solid #ddd}}img{{max-width:100%}}</style></head><body>"
            f"<h1>Comparison</h1><p>Split {result['split']}, {result['posters']} posters.</p>{table}"
            f"<h2>Paired differences</h2><ul>{items}</ul>{images}</body></html>")


def write_compare(config: CompareConfig, result: dict, reports: list, frame) -> None:
    from posterfusion.jobs.plots import per_genre_auc_plot, pr_curves_plot, reliability_plot

    out = config.out
    report, scorers, labels = reports[0]  # plots of the first (largest-vocabulary) group
    tests = {name: s.scores for name, s in scorers.items()}
    plots = {"per_genre_auc.png": lambda path: per_genre_auc_plot(path, report["metrics"], report["genres"]),
             "pr_curves.png": lambda path: pr_curves_plot(path, labels, tests),
             "reliability.png": lambda path: reliability_plot(path, labels, tests)}
    for name, draw in plots.items():  # rendered locally, then written whole (a path or a URI)
        (out / name).write_via(draw)
    names = list(plots)
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=json_default))
    (out / "report.md").write_text(markdown(result, names))
    (out / "report.html").write_text(html_page(result, names))
    _contact_sheet(config, report, scorers, frame)


def _contact_sheet(config: CompareConfig, report: dict, scorers: dict[str, Scorer], frame) -> None:
    """Top test posters per genre by the first entry: what the model 'thinks' a genre looks like."""
    import pandas as pd

    from posterfusion.jobs.contact_sheet import contact_sheet

    name = report["entries"][0]["name"]
    scores = pd.DataFrame(scorers[name].scores, columns=report["genres"])
    scores.insert(0, "movie_id", frame["movie_id"].to_numpy())
    (config.out / "contact_sheet.png").write_via(
        lambda path: contact_sheet(scores, config.on or config.catalogue, report["genres"], path))
