"""Object encodings: the bag of objects, and the bag plus where the objects are."""

from __future__ import annotations

import numpy as np
import pytest

from posterfusion.features.object_encoding import (
    LAYOUT_NAMES,
    classes_of_bag,
    encode_objects,
    object_dim,
    presence_entry,
)
from posterfusion.features.objects import Detection, object_vector

C = 80


def _person(x1, y1, x2, y2, confidence=0.9):
    return Detection(class_id=0, name="person", confidence=confidence, x1=x1, y1=y1, x2=x2, y2=y2)


def test_layout_is_the_bag_plus_where_the_objects_are():
    face = _person(0.2, 0.1, 0.8, 0.6)  # a large face, upper centre
    dog = Detection(class_id=16, name="dog", confidence=0.6, x1=0.0, y1=0.8, x2=0.2, y2=1.0)  # small, bottom left
    vector = encode_objects([face, dog], C, "layout")
    assert vector.shape == (object_dim(C, "layout"),) == (3 * C + 2 + len(LAYOUT_NAMES),)
    np.testing.assert_array_equal(vector[: 3 * C + 2], object_vector([face, dog], C))
    layout = dict(zip(LAYOUT_NAMES, vector[3 * C + 2:], strict=True))
    assert layout["largest_area"] == pytest.approx(0.3) and layout["largest_is_person"] == 1
    assert (layout["largest_cx"], layout["largest_cy"]) == pytest.approx((0.5, 0.35))
    assert layout["log_kinds"] == pytest.approx(np.log1p(2))
    assert layout["grid_20"] > 0 and layout["grid_22"] == 0  # the dog's ninth, and an empty one
    assert layout["grid_01"] == pytest.approx(0.7)  # the face covers 70 % of the top-centre ninth
    stored = [{"class_id": 0, "name": "person", "confidence": 0.9, "x1": 0.2, "y1": 0.1, "x2": 0.8, "y2": 0.6}]
    np.testing.assert_array_equal(encode_objects(stored, C, "layout"), encode_objects([face], C, "layout"))


def test_presence_is_zero_exactly_when_nothing_was_detected_in_either_encoding():
    for encoding in ("bag", "layout"):
        dim = object_dim(C, encoding)
        assert classes_of_bag(object_dim(C, "bag")) == C
        assert encode_objects([], C, encoding)[presence_entry(dim, encoding)] == 0
        assert encode_objects([_person(0, 0, 1, 1)], C, encoding)[presence_entry(dim, encoding)] > 0
        assert not encode_objects([], C, encoding).any()
