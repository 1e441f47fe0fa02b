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
from pydantic import BaseModel, Field

from posterfusion.features.catalogue import decode_rgb

if TYPE_CHECKING:
    import pandas as pd

# Formats whose Ultralytics backend can use a GPU; others (TFLite) always run on the CPU.
GPU_FORMATS = (".pt", ".torchscript", ".engine", ".onnx")

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


class DetectorConfig(BaseModel):
    weights: str = Field("yolov8n.pt", description="Ultralytics weights: .pt (downloaded where online) or .tflite")
    conf: float = Field(0.25, gt=0, lt=1, description="minimum detection confidence")
    iou: float = Field(0.45, gt=0, le=1, description="NMS IoU threshold")
    max_det: int = Field(50, ge=1, description="most detections kept per poster")
    device: str | None = Field(None, description="torch device; None = cuda if available else cpu")


def detector_id(config: DetectorConfig) -> str:
    """Stable name of a detector: weights file name, its content hash, and the thresholds.

    ``yolov8n_int8.tflite-c8c5ea2b540c-c0.25``. The hash (first 12 hex of the file's
    sha256) is left out only when the weights are not a local file (Ultralytics would
    download them). ``iou``/``max_det`` are appended only when they differ from the
    defaults, so the common id stays short while every output-changing setting is in it.
    """
    path = Path(config.weights)
    parts = [path.name]
    if path.is_file():
        with open(path, "rb") as handle:
            parts.append(hashlib.file_digest(handle, "sha256").hexdigest()[:12])
    parts.append(f"c{config.conf:g}")
    defaults = DetectorConfig.model_fields
    if config.iou != defaults["iou"].default:
        parts.append(f"iou{config.iou:g}")
    if config.max_det != defaults["max_det"].default:
        parts.append(f"max{config.max_det}")
    return "-".join(parts)


def uses_gpu(config: DetectorConfig) -> bool:
    """Whether these weights can run on a GPU at all (a TFLite export never does)."""
    return Path(config.weights).suffix in GPU_FORMATS and config.device != "cpu"


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
    """A YOLO model loaded once, turning PIL images into normalised ``Detection`` lists."""

    def __init__(self, config: DetectorConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.model = yolo_class()(config.weights, task="detect")
        # Exported formats load lazily on the first predict: pay that here, not in batch one.
        self.detect([Image.new("RGB", (64, 64))])
        names = self.model.names
        self.names: list[str] = [names[i] for i in range(len(names))]

    def detect(self, images: Sequence[Image.Image]) -> list[list[Detection]]:
        """Detections per image, in input order (RGB PIL images; Ultralytics converts)."""
        if not images:
            return []
        results = self.model.predict(list(images), verbose=False, conf=self.config.conf,
                                     iou=self.config.iou, max_det=self.config.max_det, device=self.device)
        return [_detections(result) for result in results]


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
        found = self._detect(images, errors)
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

    def _detect(self, images: dict[int, Image.Image], errors: list[str | None]) -> dict[int, list[Detection]]:
        """Detect the whole batch; if that fails, retry one by one so one poster fails alone."""
        try:
            return dict(zip(images, self.detector.detect(list(images.values())), strict=True))
        except Exception:
            found = {}
            for i, image in images.items():
                try:
                    found[i] = self.detector.detect([image])[0]
                except Exception as exc:
                    errors[i] = f"detect_failed: {type(exc).__name__}: {exc}"[:200]
            return found
