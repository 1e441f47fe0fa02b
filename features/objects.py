"""Object-detection features: what a COCO detector sees on a poster, as a fixed-length vector.

A poster's people, cars, animals, ties and knives say something about its genre that colour and
layout do not. A YOLO detector (any weights Ultralytics loads: ``.pt`` or a ``.tflite``
export run by LiteRT on CPU) finds them; ``object_vector`` folds the variable-length
detections into ``3 * C + 2`` numbers a model can be trained on, and the raw detections are
kept beside it so they can be explained or re-folded later without running the detector.

Rows are keyed by (``movie_id``, ``poster_sha256``, ``detector_id``): ``detector_id`` names
the weights by content and the thresholds, so changing either recomputes features instead
of silently mixing two detectors' outputs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from posterfusion.errors import UserValueError
from posterfusion.features.catalogue import decode_rgb
from posterfusion.locations import Location
from posterfusion.weights import find_weights, is_uri, require_weights

if TYPE_CHECKING:
    import pandas as pd

# Formats whose Ultralytics backend can use a GPU; others (TFLite) always run on the CPU.
GPU_FORMATS = (".safetensors", ".torchscript", ".engine", ".onnx")

DETECTION_TYPE = pa.struct([
    pa.field("class_id", pa.int32()),
    pa.field("name", pa.string()),
    pa.field("confidence", pa.float32()),
    pa.field("x1", pa.float32()),
    pa.field("y1", pa.float32()),
    pa.field("x2", pa.float32()),
    pa.field("y2", pa.float32()),
])

# One row per catalogue poster and detector. ``objects``/``detections`` are null exactly
# when ``detect_error`` says why the poster could not be decoded or detected.
OBJECT_FEATURES_SCHEMA = pa.schema([
    pa.field("movie_id", pa.string(), nullable=False),
    pa.field("poster_sha256", pa.string(), nullable=False),
    pa.field("detector_id", pa.string(), nullable=False),
    pa.field("objects", pa.list_(pa.float32())),
    pa.field("detections", pa.list_(DETECTION_TYPE)),
    pa.field("detect_error", pa.string()),
])


# The same COCO YOLOv8n either way; chosen per device by benchmarks/detector_throughput.py (docs/results.md):
# on this CPU the int8 TFLite export at 640 runs 21.4 posters/s, the PyTorch model 6.7/s at the same size
# (96 % of posters with the same classes) and only 35/s at 320 (54 % the same); on a GPU only the PyTorch
# model batches and runs at all.
DEFAULT_WEIGHTS = {"cpu": "yolov8n_int8.tflite", "cuda": "yolov8n_from_int8.safetensors"}


class DetectorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights: str | None = Field(None, description="detector weights: .safetensors (a state dict of "
                                "`architecture`, no pickle), .tflite (LiteRT, CPU), or .pt (only through its "
                                ".safetensors twin: a .pt file is a pickle); a path, a URI (fetched once into "
                                "the local cache) or a bare name looked up in $POSTERFUSION_WEIGHTS. None: the "
                                "device's default (DEFAULT_WEIGHTS)")
    architecture: str = Field("yolov8n.yaml", description="Ultralytics model config a .safetensors state dict fits")
    imgsz: int = Field(640, ge=32, multiple_of=32, description="inference size (a .tflite export is fixed at 640)")
    conf: float = Field(0.25, gt=0, lt=1, description="minimum detection confidence")
    iou: float = Field(0.45, gt=0, le=1, description="NMS IoU threshold")
    max_det: int = Field(50, ge=1, description="most detections kept per poster")
    device: str | None = Field(None, description="torch device; None = cuda if available else cpu")

    @model_validator(mode="after")
    def _device_default(self) -> DetectorConfig:
        if self.weights is None:
            self.weights = DEFAULT_WEIGHTS["cuda" if resolve_device(self.device).startswith("cuda") else "cpu"]
        return self


def detector_weights(config: DetectorConfig) -> Path:
    """The file the detector is loaded from (found as :mod:`posterfusion.weights` says), a ``.pt`` replaced
    by its ``.safetensors`` twin (loading a ``.pt`` would run arbitrary pickled code).

    A file found nowhere stays as given: :func:`detector_id` then has no hash to record, and loading
    it fails with the file's name.
    """
    weights = config.weights
    if is_uri(weights) and weights.endswith(".pt"):
        weights = weights[:-3] + ".safetensors"  # its twin beside it: a pickle is never even fetched
    path = find_weights(weights) or Path(weights)
    if path.suffix == ".pt":
        twin = path.with_suffix(".safetensors")
        if not twin.is_file():
            raise UserValueError(f"{path} is a pickle, which this project never loads: save its state dict as "
                                 f"{twin.name} (safetensors) beside it, or use a .tflite export")
        path = twin
    return path


def detector_id(config: DetectorConfig) -> str:
    """Stable name of a detector: weights file name, its content hash, and the thresholds.

    ``yolov8n_int8.tflite-c8c5ea2b540c-c0.25``. The hash (first 12 hex of the file's
    sha256) is left out only when the weights are not a local file (Ultralytics would
    download them). ``iou``/``max_det`` are appended only when they differ from the
    defaults, so the common id stays short while every output-changing setting is in it.
    """
    path = detector_weights(config)
    parts = [path.name]
    if path.is_file():
        with open(path, "rb") as handle:
            parts.append(hashlib.file_digest(handle, "sha256").hexdigest()[:12])
    parts.append(f"c{config.conf:g}")
    defaults = DetectorConfig.model_fields
    if config.imgsz != defaults["imgsz"].default:
        parts.append(f"s{config.imgsz}")
    if config.iou != defaults["iou"].default:
        parts.append(f"iou{config.iou:g}")
    if config.max_det != defaults["max_det"].default:
        parts.append(f"max{config.max_det}")
    return "-".join(parts)


KEY_COLUMNS = ["movie_id", "poster_sha256"]
DETECTOR_FILE = "detector.json"  # beside a detector's runs: which weights and thresholds made them


def object_store(out: str | Path | Location, detector: str):
    """The incremental store of one detector's features under ``out`` (``posterfusion features --out``)."""
    from posterfusion.features.store import FeatureStore

    return FeatureStore(out, detector, OBJECT_FEATURES_SCHEMA, KEY_COLUMNS, error_column="detect_error")


def read_object_features(out: str | Path | Location, detector: str, columns: list[str] | None = None) -> pd.DataFrame:
    """Every stored row of one detector, oldest run first (error rows and stale shas too)."""
    return object_store(out, detector).read(columns).to_pandas()


def load_object_features(out: str | Path | Location, detector: str, include_errors: bool = False) -> pd.DataFrame:
    """Features to join on: indexed by (``movie_id``, ``poster_sha256``), one row per key.

    ``objects`` holds the float32 vector (:func:`object_vector`), ``detections`` the raw boxes.
    Rows whose poster failed are left out unless ``include_errors`` (their ``objects`` is null),
    so a join that misses a key means "no features", never zeros.
    """
    return object_store(out, detector).latest(include_errors=include_errors)


def recorded_detector(out: str | Path | Location, detector: str | None = None) -> DetectorConfig:
    """The detector a features directory was made with (``posterfusion features`` records it).

    ``detector`` picks one id where the directory holds several; with one, it is the one.
    """
    root = Location.parse(out)
    found = {p.parent.name: p for p in root.list_files(DETECTOR_FILE)
             if p.relative_to(root) == f"{p.parent.name}/{DETECTOR_FILE}"}
    if detector is not None:
        found = {k: v for k, v in found.items() if k == detector}
    if len(found) != 1:
        names = sorted(found) or "none"
        raise UserValueError(f"{root} holds object features of {len(found)} detectors ({names}): "
                         "name the detector weights with --detector")
    return DetectorConfig.model_validate_json(next(iter(found.values())).read_text())


def record_detector(out: str | Path | Location, config: DetectorConfig) -> str:
    """Write ``OUT/<detector_id>/detector.json`` (weights resolved to an absolute path); return the id."""
    from posterfusion.features.lease import commit_text

    key = detector_id(config)
    commit_text(Location.parse(out) / key / DETECTOR_FILE, resolved_detector(config).model_dump_json(indent=2))
    return key


def resolved_detector(config: DetectorConfig) -> DetectorConfig:
    """``config`` naming the file it really loads, by absolute path or URI (what a bundle records)."""
    if is_uri(config.weights):
        return config  # the cached copy's path is this machine's; the URI is everyone's
    weights = detector_weights(config)
    return config.model_copy(update={"weights": str(weights.resolve())}) if weights.is_file() else config


def uses_gpu(config: DetectorConfig) -> bool:
    """Whether these weights can run on a GPU at all (a TFLite export never does)."""
    return detector_weights(config).suffix in GPU_FORMATS and config.device != "cpu"


@dataclass(frozen=True, slots=True)
class Detection:
    """One detected object; box corners normalised to [0, 1] of the poster's width/height."""

    class_id: int
    name: str
    confidence: float
    x1: float
    y1: float
    x2: float
    y2: float

    @property
    def area(self) -> float:
        """Fraction of the poster the box covers."""
        return max(0.0, self.x2 - self.x1) * max(0.0, self.y2 - self.y1)


def yolo_class() -> type:
    """Import Ultralytics' ``YOLO`` and undo the ``PIL.Image.open`` patch that import applies.

    Importing Ultralytics replaces ``PIL.Image.open`` process-wide with a wrapper that, on
    bytes Pillow cannot identify, tries to pip-install a HEIF plugin; offline it raises
    ``ModuleNotFoundError``. In a process holding a detector (a Ray actor, the service) that
    would turn every "not an image" answer of ``inspect_image_bytes`` into a crash. Posters
    are JPEG/PNG and reach the detector as decoded PIL images, so nothing needs the patch.
    """
    from ultralytics import YOLO
    from ultralytics.utils import patches

    original = getattr(patches, "_image_open", None)
    if original is not None and Image.open is not original:
        Image.open = original
    return YOLO


def object_vector(detections: Sequence[Detection], num_classes: int) -> np.ndarray:
    """Fold a poster's detections into a fixed-length float32 vector of ``3 * C + 2``.

    Layout (``object_feature_names`` spells it out): for class ``c`` at ``3c .. 3c+2``,
    ``log1p(count)``, the highest confidence (0 when absent) and the summed box area as a
    fraction of the poster, clipped to 1; then ``log1p(total objects)`` and the summed area
    of all boxes, clipped to 1. Counts are log-scaled so a crowd does not dwarf everything
    else; areas are sums (not unions) because overlap is itself a cue (a group shot).
    """
    counts = np.zeros(num_classes, np.float64)
    best = np.zeros(num_classes, np.float64)
    areas = np.zeros(num_classes, np.float64)
    for detection in detections:
        c = detection.class_id
        if not 0 <= c < num_classes:
            raise ValueError(f"class id {c} outside a {num_classes}-class detector")
        counts[c] += 1
        best[c] = max(best[c], detection.confidence)
        areas[c] += detection.area
    vector = np.zeros(3 * num_classes + 2, np.float32)
    per_class = vector[: 3 * num_classes].reshape(num_classes, 3)
    per_class[:, 0] = np.log1p(counts)
    per_class[:, 1] = best
    per_class[:, 2] = np.minimum(areas, 1.0)
    vector[-2] = np.log1p(len(detections))
    vector[-1] = min(float(areas.sum()), 1.0)
    return vector


def object_feature_names(names: Sequence[str]) -> list[str]:
    """Column names of ``object_vector``'s entries, e.g. ``obj_traffic_light_max_conf``."""
    columns = []
    for name in names:
        slug = "_".join(name.lower().split())
        columns += [f"obj_{slug}_log_count", f"obj_{slug}_max_conf", f"obj_{slug}_area"]
    return [*columns, "obj_total_log_count", "obj_total_area"]


def resolve_device(device: str | None) -> str:
    """``None`` means the GPU when this process can see one, else the CPU."""
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Detector:
    """A YOLO model loaded once, turning PIL images into normalised ``Detection`` lists.

    One call at a time per instance (a lock): Ultralytics predictors keep per-call state, and a
    Serve replica may run two batches' worker threads at once.
    """

    def __init__(self, config: DetectorConfig):
        import threading

        self.config = config
        self.device = resolve_device(config.device)
        self._lock = threading.Lock()
        self.model = load_yolo(config)
        # Exported formats load lazily on the first predict: pay that here, not in batch one.
        self.detect([Image.new("RGB", (64, 64))])
        names = self.model.names
        self.names: list[str] = [names[i] for i in range(len(names))]

    def detect(self, images: Sequence[Image.Image]) -> list[list[Detection]]:
        """Detections per image, in input order (RGB PIL images; Ultralytics converts)."""
        if not images:
            return []
        with self._lock:
            results = self.model.predict(list(images), verbose=False, conf=self.config.conf, iou=self.config.iou,
                                         max_det=self.config.max_det, device=self.device, imgsz=self.config.imgsz,
                                         half=self.device.startswith("cuda"), batch=len(images))
        return [_detections(result) for result in results]

    def detect_each(self, images: Sequence[Image.Image]) -> list[list[Detection] | str]:
        """:meth:`detect` on the batch; if that raises, one image at a time, so one bad image fails alone.

        A failing image gets its reason (``detect_failed: …``) in place of its detections.
        """
        try:
            return list(self.detect(images))
        except Exception:
            results: list[list[Detection] | str] = []
            for image in images:
                try:
                    results.append(self.detect([image])[0])
                except Exception as exc:
                    results.append(f"detect_failed: {type(exc).__name__}: {exc}"[:200])
            return results


def load_yolo(config: DetectorConfig):
    """An Ultralytics ``YOLO`` for the config, never unpickling anything.

    A ``.safetensors`` state dict is loaded into the ``architecture`` built from Ultralytics' own
    YAML (no download), with the COCO class names of Ultralytics' ``coco.yaml``; a ``.tflite``
    export is opened by LiteRT.
    """
    path = require_weights(detector_weights(config), "detector weights file")
    yolo = yolo_class()
    if path.suffix != ".safetensors":
        return yolo(str(path), task="detect")
    import yaml
    from safetensors.torch import load_file
    from ultralytics.utils import ROOT

    model = yolo(config.architecture, task="detect")
    model.model.load_state_dict(load_file(str(path)), strict=True)
    names = yaml.safe_load((ROOT / "cfg" / "datasets" / "coco.yaml").read_text())["names"]
    model.model.names = dict(names) if isinstance(names, dict) else dict(enumerate(names))
    model.model.eval()
    return model


def load_detector(config: DetectorConfig, expected_id: str | None = None) -> Detector:
    """The detector of ``config``, refusing weights that are not the ones ``expected_id`` names.

    A bundle records the detector its object features came from; other weights at the same path
    would silently feed the network features it never saw.
    """
    if expected_id is not None:
        found = detector_id(config)
        if found != expected_id:
            raise UserValueError(f"detector weights {config.weights} are {found}, but the bundle was trained with "
                             f"{expected_id}: restore those weights or retrain")
    return Detector(config)


def _detections(result: Any) -> list[Detection]:
    boxes = result.boxes
    classes = boxes.cls.cpu().numpy().astype(int)
    confidences = boxes.conf.cpu().numpy()
    corners = np.clip(boxes.xyxyn.cpu().numpy(), 0.0, 1.0)
    return [Detection(int(c), str(result.names[int(c)]), float(p), *map(float, xyxy))
            for c, p, xyxy in zip(classes, confidences, corners, strict=True)]


class ObjectFeaturizer:
    """Ray Data actor: a batch of catalogue rows in, one feature row per poster out.

    For ``map_batches(ObjectFeaturizer, compute=ActorPoolStrategy(...))`` so each actor
    loads the model once. No row is ever dropped: a poster that cannot be decoded (or makes
    the detector fail) gets null features and the reason in ``detect_error``.
    """

    def __init__(self, config: DetectorConfig, detector_key: str | None = None):
        self.detector = Detector(config)
        # The driver passes its id so keys agree even where weights live elsewhere on workers.
        self.detector_id = detector_key or detector_id(config)

    def __call__(self, batch: pd.DataFrame | dict[str, np.ndarray]) -> pa.Table:
        import pandas as pd

        frame = batch if isinstance(batch, pd.DataFrame) else pd.DataFrame(dict(batch))
        errors: list[str | None] = [None] * len(frame)
        images: dict[int, Image.Image] = {}
        for i, data in enumerate(frame["poster"]):
            try:
                images[i] = decode_rgb(data)
            except ValueError as exc:
                errors[i] = str(exc)
        found = {}
        for i, result in zip(images, self.detector.detect_each(list(images.values())), strict=True):
            if isinstance(result, str):
                errors[i] = result
            else:
                found[i] = result
        num_classes = len(self.detector.names)
        return pa.table({
            "movie_id": pa.array(frame["movie_id"].astype(str).tolist(), pa.string()),
            "poster_sha256": pa.array(frame["poster_sha256"].astype(str).tolist(), pa.string()),
            "detector_id": pa.array([self.detector_id] * len(frame), pa.string()),
            "objects": pa.array([object_vector(found[i], num_classes).tolist() if i in found else None
                                 for i in range(len(frame))], pa.list_(pa.float32())),
            "detections": pa.array([[asdict(d) for d in found[i]] if i in found else None
                                    for i in range(len(frame))], pa.list_(DETECTION_TYPE)),
            "detect_error": pa.array(errors, pa.string()),
        }, schema=OBJECT_FEATURES_SCHEMA)
