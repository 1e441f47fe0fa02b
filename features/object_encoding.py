"""How a poster's detections become the object vector a fused network reads: a bag, or a bag plus its layout.

``bag`` (:func:`~posterfusion.features.objects.object_vector`): per class the count, the best
confidence and the area share — what is on the poster, not where. ``layout`` adds where: the
largest object's size, centre, shape and whether it is a person, how many kinds of object there
are, and how the boxes' area spreads over a 3 × 3 grid (a face filling the frame, a small figure in
a landscape, a crowd along the bottom). Both are computed from the stored detections, so a new
encoding needs no new detection pass; the bundle records which one its network reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from posterfusion.features.objects import Detection, object_vector

ObjectEncoding = Literal["bag", "layout"]
LAYOUT_NAMES = ["largest_area", "largest_cx", "largest_cy", "largest_log_aspect", "largest_is_person",
                "log_kinds", *[f"grid_{row}{col}" for row in range(3) for col in range(3)]]
PERSON = 0  # COCO's class 0


def object_dim(num_classes: int, encoding: ObjectEncoding) -> int:
    return 3 * num_classes + 2 + (len(LAYOUT_NAMES) if encoding == "layout" else 0)


def presence_entry(object_dim: int, encoding: ObjectEncoding) -> int:
    """The entry holding ``log1p(total objects)`` (``3 C`` in either encoding): 0 exactly when nothing was detected."""
    return object_dim - 2 - (len(LAYOUT_NAMES) if encoding == "layout" else 0)


def classes_of_bag(bag_dim: int) -> int:
    """The detector's class count, from the length of its stored bag vectors (``3 C + 2``)."""
    return (bag_dim - 2) // 3


def encode_objects(detections: Sequence[Detection | dict], num_classes: int, encoding: ObjectEncoding) -> np.ndarray:
    """The object vector of one poster's detections (stored dicts or fresh :class:`Detection` s)."""
    found = [d if isinstance(d, Detection) else Detection(**d) for d in detections]
    bag = object_vector(found, num_classes)
    return bag if encoding == "bag" else np.concatenate([bag, layout_vector(found)])


def layout_vector(detections: Sequence[Detection]) -> np.ndarray:
    """Where the objects are: see the module docstring (zeros when nothing was detected)."""
    out = np.zeros(len(LAYOUT_NAMES), np.float32)
    if not detections:
        return out
    largest = max(detections, key=lambda d: d.area)
    width, height = max(largest.x2 - largest.x1, 1e-3), max(largest.y2 - largest.y1, 1e-3)
    kinds = len({d.class_id for d in detections})
    out[:6] = [largest.area, (largest.x1 + largest.x2) / 2, (largest.y1 + largest.y2) / 2,
               np.log(width / height), float(largest.class_id == PERSON), np.log1p(kinds)]
    out[6:] = np.minimum(_grid_area(detections), 1.0).ravel()
    return out


def _grid_area(detections: Sequence[Detection]) -> np.ndarray:
    """(3, 3): the summed box area falling in each ninth of the poster, as a share of that ninth."""
    grid = np.zeros((3, 3))
    edges = np.array([0.0, 1 / 3, 2 / 3, 1.0])
    for d in detections:
        xs = np.clip(np.minimum(d.x2, edges[1:]) - np.maximum(d.x1, edges[:-1]), 0, None)
        ys = np.clip(np.minimum(d.y2, edges[1:]) - np.maximum(d.y1, edges[:-1]), 0, None)
        grid += np.outer(ys, xs) * 9
    return grid
