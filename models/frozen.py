"""Backbone features extracted once: the frozen-backbone training path and the fast head warm-up.

A pretrained backbone that is not being trained maps each poster to the same pooled vector
every epoch; computing it once (Ray Data, an actor pool each holding the backbone) and
training the fusion head on the stored vectors makes an epoch cost milliseconds instead of
minutes on a CPU. The vectors are stored per poster (keyed by ``poster_sha256``: the image
alone decides them) in a :class:`~posterfusion.features.store.FeatureStore` named by the
backbone, its starting weights' hash and the image size, so every variant and seed trained on
one catalogue shares them, and a catalogue that grows computes only its new posters.

Each poster is stored as seen by the eval preset and horizontally flipped: a head trained on
frozen features draws one of the two per epoch, the one augmentation that survives freezing.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from posterfusion.locations import Location

KEY_COLUMNS = ["poster_sha256"]
BACKBONE_FEATURES_SCHEMA = pa.schema([
    pa.field("poster_sha256", pa.string(), nullable=False),
    pa.field("features", pa.list_(pa.float32())),
    pa.field("flipped", pa.list_(pa.float32())),
    pa.field("error", pa.string()),
])


class BackboneFeaturesConfig(BaseModel):
    """Which features: a backbone, its starting weights and the image size it sees — or, for side
    corrections trained on a kept poster path whose backbone was fine-tuned, that trained network's own."""

    model_config = ConfigDict(extra="forbid")

    backbone: str
    weights: str
    image_size: int = Field(ge=16)
    batch_size: int = Field(32, ge=1)
    bundle: str | None = Field(None, description="a trained bundle whose backbone (as trained) gives the features")
    bundle_version: str | None = Field(None, description="that bundle's version, as checked on the driver")
    member: int = Field(0, ge=0, description="which network of an ensemble bundle")

    def key(self) -> str:
        from posterfusion.models.backbones import weights_id

        if self.bundle:
            return f"{self.backbone}-bundle-{self.bundle_version}-m{self.member}-{self.image_size}px"
        return f"{self.backbone}-{weights_id(self.weights)}-{self.image_size}px"

    def create(self):
        """The backbone that computes these features, in eval mode."""
        from posterfusion.models.backbones import create_backbone

        if not self.bundle:
            return create_backbone(self.backbone, self.weights).eval()
        from posterfusion.models.bundle import load_bundle

        bundle = load_bundle(self.bundle)
        if bundle.version != self.bundle_version:
            raise RuntimeError(f"{self.bundle} changed since it was checked (version {bundle.version}, "
                               f"checked {self.bundle_version})")
        state = bundle.network_state(self.member)
        backbone = create_backbone(self.backbone, "none")
        backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items()
                                  if k.startswith("backbone.")})
        return backbone.eval()


def backbone_store(cache: Path | Location, config: BackboneFeaturesConfig):
    """The features of one backbone, weights and size under ``cache`` (a local path or a URI)."""
    from posterfusion.features.store import FeatureStore

    return FeatureStore(Location.parse(cache) / "backbone-features", config.key(), BACKBONE_FEATURES_SCHEMA,
                        KEY_COLUMNS, error_column="error")


class BackboneFeaturizer:
    """Ray Data actor: catalogue rows (poster bytes) in, pooled backbone features out."""

    def __init__(self, config: BackboneFeaturesConfig, threads: int = 1):
        import torch

        from posterfusion.models.fusion import ModelConfig
        from posterfusion.models.network import input_preset

        self.backbone = config.create().to(memory_format=torch.channels_last)
        self.preset = input_preset(ModelConfig(backbone=config.backbone, image_size=config.image_size))
        self.size = config.image_size
        torch.set_num_threads(threads)

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        import torch

        from posterfusion.features.catalogue import PosterDecodeError
        from posterfusion.features.presets import decode_poster

        images, errors = [], []
        for data in batch["poster"]:
            try:
                images.append(decode_poster(data, self.size))
                errors.append(None)
            except PosterDecodeError as exc:
                images.append(torch.zeros(3, self.size, self.size, dtype=torch.uint8))
                errors.append(str(exc))
        from posterfusion.models.hardware import autocast

        with torch.inference_mode(), autocast("cpu"):
            inputs = self.preset(torch.stack(images)).contiguous(memory_format=torch.channels_last)
            plain = self.backbone(inputs).float().numpy()
            flipped = self.backbone(inputs.flip(-1)).float().numpy()
        good = [e is None for e in errors]
        return pa.table({
            "poster_sha256": pa.array(batch["poster_sha256"].astype(str).tolist(), pa.string()),
            "features": pa.array([p.tolist() if ok else None for p, ok in zip(plain, good, strict=True)],
                                 pa.list_(pa.float32())),
            "flipped": pa.array([p.tolist() if ok else None for p, ok in zip(flipped, good, strict=True)],
                                pa.list_(pa.float32())),
            "error": pa.array(errors, pa.string()),
        }, schema=BACKBONE_FEATURES_SCHEMA)


def ensure_backbone_features(catalogue: Path | Location, cache: Path | Location,
                             config: BackboneFeaturesConfig) -> dict:
    """Extract features for every catalogue poster not yet in the cache; return a summary."""
    import ray

    from posterfusion.cluster import actor_pool, model_actors
    from posterfusion.features.catalogue import catalogue_files
    from posterfusion.features.store import keep_keys, plan_missing

    started = time.perf_counter()
    store = backbone_store(cache, config)
    files, todo, rows = plan_missing(catalogue_files(catalogue), store.present_keys(), KEY_COLUMNS)
    if len(todo):
        pool = actor_pool(None, model_actors(len(todo), config.batch_size))

        def write(staging: Location) -> None:
            ds = ray.data.read_parquet(files.paths, filesystem=files.filesystem, columns=["poster_sha256", "poster"],
                                       num_cpus=0.1)
            ds = ds.map_batches(keep_keys, batch_format="pyarrow", num_cpus=0.1,
                                fn_kwargs={"keys": todo, "columns": KEY_COLUMNS})
            ds = ds.repartition(target_num_rows_per_block=config.batch_size)
            ds = ds.map_batches(BackboneFeaturizer, fn_constructor_kwargs={"config": config, "threads": pool.threads},
                                compute=pool.strategy(), num_cpus=pool.cpus,
                                num_gpus=pool.gpus, batch_size=config.batch_size, batch_format="pandas")
            ds.write_parquet(staging.fs_path, filesystem=staging.filesystem, ray_remote_args={"num_cpus": 0.1})

        store.write_run(write)
    return {"key": config.key(), "catalogue_rows": rows, "computed": len(todo),
            "seconds": round(time.perf_counter() - started, 1), "store": str(store.folder)}


def load_backbone_features(cache: Path | Location, config: BackboneFeaturesConfig,
                           shas) -> tuple[np.ndarray, np.ndarray]:
    """(plain, flipped) float32 matrices for ``shas`` in order; every one must have been extracted."""
    frame = backbone_store(cache, config).latest()
    missing = [s for s in shas if s not in frame.index]
    if missing:
        raise ValueError(f"{len(missing)} posters have no backbone features under {config.key()} "
                         f"(e.g. {missing[0]}): the extraction failed for them")
    rows = frame.loc[list(shas)]
    return (np.stack(rows["features"].to_numpy()).astype(np.float32),
            np.stack(rows["flipped"].to_numpy()).astype(np.float32))
