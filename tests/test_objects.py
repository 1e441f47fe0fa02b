"""Object-detection features: the vector's layout, the detector's id, real detections, the job.

The job tests use the real int8 TFLite YOLOv8n in ``../shared/weights`` (LiteRT on CPU):
its detections on real posters are what the features are for, and it loads in about a second.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from posterfusion.features.catalogue import CATALOGUE_SCHEMA, split_of
from posterfusion.features.objects import (
    OBJECT_FEATURES_SCHEMA,
    Detection,
    DetectorConfig,
    ObjectFeaturizer,
    decode_rgb,
    detector_id,
    object_feature_names,
    object_vector,
)

from support import SHARED, jpeg_bytes, noisy_jpeg_bytes

WEIGHTS = SHARED / "weights" / "yolov8n_int8.tflite"
# Real posters: tt0086425 shows two people; the others are a mix for the job tests.
REAL_IDS = ["tt0086425", "tt0084058", "tt0084867", "tt0085154", "tt0085159", "tt0085208", "tt0085236",
            "tt0085244"]


def det(class_id, confidence, x1, y1, x2, y2, name="x"):
    return Detection(class_id, name, confidence, x1, y1, x2, y2)


# --- the vector -------------------------------------------------------------------------

def test_object_vector_counts_max_confidence_and_area_per_class():
    detections = [det(0, 0.9, 0.0, 0.0, 0.5, 0.5), det(0, 0.6, 0.5, 0.5, 1.0, 1.0),
                  det(2, 0.4, 0.1, 0.2, 0.3, 0.7)]
    vector = object_vector(detections, num_classes=3)
    assert vector.dtype == np.float32 and vector.shape == (3 * 3 + 2,)
    expected = [math.log1p(2), 0.9, 0.5,   # class 0: two boxes of 0.25 each
                0.0, 0.0, 0.0,             # class 1: absent
                math.log1p(1), 0.4, 0.1,   # class 2: 0.2 × 0.5
                math.log1p(3), 0.6]        # all: three objects covering 0.25 + 0.25 + 0.1
    np.testing.assert_allclose(vector, np.array(expected, np.float32), rtol=1e-6)


def test_object_vector_clips_summed_areas_to_one():
    whole = det(1, 0.8, 0.0, 0.0, 1.0, 1.0)
    vector = object_vector([whole, whole, whole], num_classes=2)
    assert vector[3 + 2] == 1.0 and vector[-1] == 1.0 and vector[3] == np.float32(math.log1p(3))


def test_no_detections_is_all_zeros_of_fixed_length():
    for classes in (1, 80):
        vector = object_vector([], num_classes=classes)
        assert vector.shape == (3 * classes + 2,) and not vector.any()


def test_a_class_id_outside_the_detector_is_an_error():
    with pytest.raises(ValueError, match="class id 5"):
        object_vector([det(5, 0.5, 0, 0, 1, 1)], num_classes=3)


def test_feature_names_follow_the_vector_layout():
    names = object_feature_names(["person", "traffic light"])
    assert names == ["obj_person_log_count", "obj_person_max_conf", "obj_person_area",
                     "obj_traffic_light_log_count", "obj_traffic_light_max_conf", "obj_traffic_light_area",
                     "obj_total_log_count", "obj_total_area"]
    assert len(names) == len(object_vector([], 2))


# --- the detector's id and decoding -------------------------------------------------------

def test_detector_id_names_weights_by_content_and_thresholds(tmp_path):
    weights = tmp_path / "w.tflite"
    weights.write_bytes(b"weights one")
    config = DetectorConfig(weights=str(weights))
    base = detector_id(config)
    assert base.startswith("w.tflite-") and base.endswith("-c0.25") and len(base.split("-")[1]) == 12
    assert detector_id(config) == base
    assert detector_id(config.model_copy(update={"conf": 0.5})) != base
    assert detector_id(config.model_copy(update={"iou": 0.6})) != base
    assert detector_id(config.model_copy(update={"imgsz": 320})) == base.replace("-c0.25", "-c0.25-s320")
    weights.write_bytes(b"weights two")
    assert detector_id(config) != base
    assert detector_id(DetectorConfig(weights="absent.safetensors")) == "absent.safetensors-c0.25"  # no file: no hash


def test_the_default_detector_is_the_one_measured_fastest_for_the_device(monkeypatch):
    """CPU: the int8 TFLite export (21 posters/s vs 6.7 for the PyTorch model at 640); GPU: the PyTorch model."""
    from posterfusion.features.objects import DetectorConfig, detector_weights

    monkeypatch.setenv("POSTERFUSION_WEIGHTS", str(SHARED / "weights"))
    cpu = DetectorConfig(device="cpu")
    assert cpu.weights == "yolov8n_int8.tflite" and detector_weights(cpu) == SHARED / "weights" / cpu.weights
    assert DetectorConfig(device="cuda:0").weights == "yolov8n_from_int8.safetensors"
    assert DetectorConfig(weights="mine.tflite", device="cuda").weights == "mine.tflite"  # given: kept


def test_a_pickled_detector_is_never_loaded_only_its_safetensors_twin(tmp_path):
    from posterfusion.features.objects import detector_weights

    (tmp_path / "y.pt").write_bytes(b"a pickle")
    with pytest.raises(ValueError, match="is a pickle, which this project never loads"):
        detector_weights(DetectorConfig(weights=str(tmp_path / "y.pt")))
    (tmp_path / "y.safetensors").write_bytes(b"tensors")
    assert detector_weights(DetectorConfig(weights=str(tmp_path / "y.pt"))) == tmp_path / "y.safetensors"
    assert detector_id(DetectorConfig(weights=str(tmp_path / "y.pt"))).startswith("y.safetensors-")


@pytest.mark.slow
def test_the_safetensors_detector_finds_what_the_tflite_reference_finds(shared_data):
    """The same COCO weights two ways: a PyTorch state dict (no pickle, batched) and the int8 TFLite export."""
    from posterfusion.features.catalogue import decode_rgb
    from posterfusion.features.objects import Detector

    images = [decode_rgb(p.read_bytes()) for p in sorted((shared_data / "multilabel-posters" / "Images")
                                                         .glob("*.jpg"))[:24]]
    torch_model = Detector(DetectorConfig(weights=str(WEIGHTS.with_name("yolov8n_from_int8.safetensors")),
                                          device="cpu"))
    reference = Detector(DetectorConfig(weights=str(WEIGHTS), device="cpu"))
    assert torch_model.names == reference.names and len(torch_model.names) == 80
    same = [{d.name for d in a} == {d.name for d in b}
            for a, b in zip(torch_model.detect(images), reference.detect(images), strict=True)]
    assert sum(same) >= 0.75 * len(images)  # the README measured 43/48 identical class multisets


def test_a_bundle_refuses_a_detector_whose_weights_changed(tmp_path):
    from posterfusion.features.objects import load_detector

    weights = tmp_path / "w.tflite"
    weights.write_bytes(b"trained with these")
    trained = detector_id(DetectorConfig(weights=str(weights)))
    weights.write_bytes(b"not the same weights")
    with pytest.raises(ValueError, match="but the bundle was trained with"):
        load_detector(DetectorConfig(weights=str(weights)), expected_id=trained)


def test_shared_weights_id_is_the_documented_one():
    assert detector_id(DetectorConfig(weights=str(WEIGHTS))) == "yolov8n_int8.tflite-c8c5ea2b540c-c0.25"


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "empty_file"), (None, "empty_file"), (b"not an image", "not_an_image"),
    (noisy_jpeg_bytes(3)[:600], "truncated_image"),
])
def test_bad_poster_bytes_raise_a_reason(data, reason):
    with pytest.raises(ValueError, match=f"^{reason}"):
        decode_rgb(data)


def test_posters_decode_to_rgb():
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (20, 30), 128).save(buffer, "PNG")
    image = decode_rgb(buffer.getvalue())
    assert image.mode == "RGB" and image.size == (20, 30)


def test_loading_ultralytics_leaves_pillow_able_to_reject_non_images():
    from PIL import Image

    from posterfusion.features.catalogue import inspect_image_bytes
    from posterfusion.features.objects import yolo_class

    yolo_class()  # importing Ultralytics patches Image.open to pip-install a HEIF plugin on unknown bytes
    assert Image.open.__module__.startswith("PIL")
    assert inspect_image_bytes(b"not an image").reject_reason == "not_an_image"


# --- real detections ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def featurizer():
    return ObjectFeaturizer(DetectorConfig(weights=str(WEIGHTS), device="cpu"))


@pytest.mark.slow
def test_the_shared_model_finds_people_on_real_posters(featurizer, shared_data):
    from PIL import Image

    images = [Image.open(shared_data / "multilabel-posters" / "Images" / f"{i}.jpg").convert("RGB")
              for i in REAL_IDS[:4]]
    found = featurizer.detector.detect(images)
    assert len(featurizer.detector.names) == 80 and featurizer.detector.names[0] == "person"
    people = [d for d in found[0] if d.name == "person"]
    assert len(people) >= 2 and max(d.confidence for d in people) > 0.9  # tt0086425: 0.93 and 0.80
    for detections in found:
        for d in detections:
            assert 0 <= d.x1 <= d.x2 <= 1 and 0 <= d.y1 <= d.y2 <= 1 and d.confidence >= 0.25


@pytest.mark.slow
def test_featurizer_keeps_every_row_and_says_why_one_failed(featurizer, shared_data):
    import pandas as pd

    poster = (shared_data / "multilabel-posters" / "Images" / "tt0086425.jpg").read_bytes()
    batch = pd.DataFrame({"movie_id": ["a", "b", "c"], "poster_sha256": ["1", "2", "3"],
                          "poster": [poster, b"garbage", jpeg_bytes()]})
    table = featurizer(batch)
    assert table.schema == OBJECT_FEATURES_SCHEMA and table.num_rows == 3
    rows = table.to_pylist()
    assert [r["detect_error"] for r in rows] == [None, "not_an_image", None]
    assert rows[1]["objects"] is None and rows[1]["detections"] is None
    assert len(rows[0]["objects"]) == 3 * 80 + 2 and rows[0]["objects"][0] == pytest.approx(math.log1p(2))
    assert {d["name"] for d in rows[0]["detections"]} >= {"person"}
    as_dict = featurizer({k: np.asarray(v, dtype=object) for k, v in batch.items()})  # numpy batches too
    assert as_dict.equals(table)


# --- the job --------------------------------------------------------------------------------

def write_catalogue(root, posters: dict[str, bytes]) -> None:
    """A catalogue Parquet file with just enough real columns for the features job."""
    import hashlib

    rows = [{"movie_id": movie_id, "poster": data, "poster_sha256": hashlib.sha256(data).hexdigest(),
             "width": 1, "height": 1, "genres": [], "labelled": False, "split": split_of(movie_id),
             "grayscale": False, "small": False, "landscape": False, "duplicate_poster": False,
             "source": "test"} for movie_id, data in posters.items()]
    data = root / "data"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    table = pa.Table.from_pylist(rows, schema=CATALOGUE_SCHEMA)
    pq.write_table(table.slice(0, 5), data / "part-0.parquet", row_group_size=3)
    pq.write_table(table.slice(5), data / "part-1.parquet", row_group_size=3)


def feature_rows(*keys: tuple[str, str, float | None]) -> pa.Table:
    """Stored feature rows (movie_id, sha, first vector value; None = a failed poster)."""
    return pa.Table.from_pylist([
        {"movie_id": m, "poster_sha256": sha, "detector_id": "d", "objects": None if v is None else [v, 0.0],
         "detections": None if v is None else [], "detect_error": "not_an_image" if v is None else None}
        for m, sha, v in keys], schema=OBJECT_FEATURES_SCHEMA)


def test_readers_take_finished_runs_only_and_the_latest_row_per_key(tmp_path):
    from posterfusion.features.objects import load_object_features, object_store, read_object_features

    assert object_store(tmp_path, "d").files() == [] and read_object_features(tmp_path, "d").empty
    for run, rows in {"run-1": [("a", "1", 1.0), ("b", "2", None)], "run-2": [("a", "1", 2.0)],
                      "_run-3": [("c", "3", 3.0)]}.items():
        (tmp_path / "d" / run).mkdir(parents=True)
        pq.write_table(feature_rows(*rows), tmp_path / "d" / run / "part.parquet")
    assert len(object_store(tmp_path, "d").files()) == 2  # _run-3 is still being written
    assert len(read_object_features(tmp_path, "d")) == 3
    features = load_object_features(tmp_path, "d")
    assert list(features.index) == [("a", "1")] and features.loc[("a", "1"), "objects"][0] == 2.0
    assert len(load_object_features(tmp_path, "d", include_errors=True)) == 2
    present = object_store(tmp_path, "d").present_keys().to_pylist()
    assert present == ["a\x1f1"] * 2  # b failed: not present, so the next run computes it again


def test_actor_pool_leaves_a_whole_cpu_for_file_listing(ray_session, tmp_path):
    from posterfusion.jobs.features import FeaturesConfig, detector_pool

    config = FeaturesConfig(catalogue=tmp_path, out=tmp_path, detector=DetectorConfig(weights=str(WEIGHTS)))
    assert detector_pool(config, rows=1000) == (2, 0.5, 0.0)  # 2 CPUs: 1 for actors, 1 for listing
    assert detector_pool(config, rows=3) == (1, 1.0, 0.0)  # one batch needs one actor
    with pytest.raises(ValueError, match="file listing"):
        detector_pool(config.model_copy(update={"actors": 2, "cpus_per_actor": 0.75}), rows=1000)


@pytest.mark.slow
def test_features_job_is_incremental_and_never_drops_a_row(ray_session, shared_data, tmp_path):
    from posterfusion.features.objects import load_object_features, read_object_features, recorded_detector
    from posterfusion.jobs.features import FeaturesConfig, format_features_summary, run_features

    images = shared_data / "multilabel-posters" / "Images"
    posters = {i: (images / f"{i}.jpg").read_bytes() for i in REAL_IDS}
    posters["tt9999999"] = b"\xff\xd8 not really a jpeg"
    catalogue, out = tmp_path / "catalogue", tmp_path / "features"
    write_catalogue(catalogue, posters)
    config = FeaturesConfig(catalogue=catalogue, out=out, batch_size=4,
                            detector=DetectorConfig(weights=str(WEIGHTS)))

    first = run_features(config)
    assert first["catalogue_rows"] == 9 and first["already_present"] == 0 and first["computed"] == 9
    assert first["reconciles"] and first["errors"] == {"count": 1, "reasons": {"not_an_image": 1}}
    assert first["top_classes"]["person"] >= 2
    assert "9 computed" in format_features_summary(first)
    files = list((out / first["detector_id"]).rglob("*.parquet"))
    assert files and all(pq.read_schema(f).types == OBJECT_FEATURES_SCHEMA.types for f in files)

    assert recorded_detector(out).weights == str(WEIGHTS.resolve())  # later stages take it from here

    # A rerun after one poster changed: the changed poster (a new sha) and the failed one are tried again,
    # nothing else; the failure is recorded again, the old row of the changed poster kept.
    changed = dict(posters, tt0084058=jpeg_bytes(color=(10, 200, 10)))
    write_catalogue(catalogue, changed)
    second = run_features(config)
    assert second["already_present"] == 7 and second["computed"] == 2 and second["errors"]["count"] == 1

    stored = read_object_features(out, first["detector_id"])
    assert len(stored) == 11 and set(stored["detector_id"]) == {first["detector_id"]}
    features = load_object_features(out, first["detector_id"])
    assert len(features) == 9  # 7 unchanged + old and new sha of the changed one; the bad one left out
    new_sha = pq.read_table(catalogue / "data").to_pandas().set_index("movie_id").loc["tt0084058", "poster_sha256"]
    assert ("tt0084058", new_sha) in features.index
    vector = features.loc[("tt0086425", features.loc["tt0086425"].index[0]), "objects"]
    assert vector.dtype == np.float32 and vector.shape == (3 * 80 + 2,)
    with_errors = load_object_features(out, first["detector_id"], include_errors=True)
    assert with_errors.loc["tt9999999", "detect_error"].iloc[0] == "not_an_image"


def test_a_small_input_gets_fewer_model_actors_unless_the_user_asks_for_more():
    from posterfusion.cluster import ROWS_PER_MODEL_ACTOR, model_actors

    assert model_actors(66, 8) == 1  # an actor's start costs more than scoring 66 posters on another
    assert model_actors(ROWS_PER_MODEL_ACTOR * 3 + 1, 8) == 4 and model_actors(10_000, 512) == 20
    assert model_actors(66, 8, requested=2) == 9  # a user's number is clamped by batches alone
    assert model_actors(0, 8) == 1
