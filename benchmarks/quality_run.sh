#!/usr/bin/env bash
# The real-data quality run: ingest all of ../shared/data → YOLO features → train variants.
# Usage: benchmarks/quality_run.sh [WORK_DIR] [VARIANT ...]
#   env: EPOCHS (15) IMAGE_SIZE (64) BACKBONE (densenet121) PATIENCE (4)
# Prints each stage's summary; each variant's bundle holds metrics.json with the per-epoch history.
set -euo pipefail
work=${1:-runs/quality}; shift || true
variants=("${@:-cnn fused}")
shared=${SHARED:-../shared}
bin=${BIN:-.venv/bin}
"$bin/posterfusion" ingest --overwrite --out "$work/catalogue" \
  --source "multilabel:$shared/data/multilabel-posters" \
  --metadata "$shared/data/metadata/imdb5000.csv" \
  --metadata "$shared/data/metadata/tmdb_movies_metadata_subset.csv"
"$bin/posterfusion" features --catalogue "$work/catalogue" --out "$work/features" \
  --detector "$shared/weights/yolov8n_int8.tflite"
for variant in ${variants[@]}; do
  "$bin/posterfusion" train --catalogue "$work/catalogue" --features "$work/features" \
    --detector "$shared/weights/yolov8n_int8.tflite" --variant "$variant" \
    --backbone "${BACKBONE:-densenet121}" --image-size "${IMAGE_SIZE:-64}" --epochs "${EPOCHS:-15}" \
    --patience "${PATIENCE:-4}" --batch-size 32 --out "$work/model-${variant/+/_}"
done
