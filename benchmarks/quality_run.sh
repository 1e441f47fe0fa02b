#!/usr/bin/env bash
# The real-data quality run behind docs/results.md: all of ../shared/data, every stage.
#   1. ingest the Kaggle multi-label set (+ IMDB-5000, TMDb) and the MovieGenre slice (another source)
#   2. YOLO object features for the dev catalogue
#   3. compare --recipe quality: cnn, cnn+objects, cnn+metadata, fused, flags-only × seeds 0 and 1
#   4. the frozen-backbone baseline fine-tuning must beat: quality vs frozen, cnn and fused, seed 0
#   5. compare the seed systems' recipes (CNN-only, as those systems were) side by side
#   6. evaluate the quality cnn and fused bundles on the MovieGenre source they never saw
#   7. the routed fused (posterfusion route: the fused network where validation shows it better, the cnn
#      elsewhere) beside cnn, per slice, on the test split and on the MovieGenre source
# Usage: benchmarks/quality_run.sh [WORK_DIR]     (env: SEEDS="0 1", SHARED=../shared, BIN=.venv/bin)
# Bundles already in WORK_DIR/models are reused when their settings and catalogue still match
# (compare refuses stale ones), so a stopped run continues where it stopped.
set -euo pipefail
work=${1:-runs/quality}
shared=${SHARED:-../shared}
bin=${BIN:-.venv/bin}
detector="$shared/weights/yolov8n_int8.tflite"
seeds=()
for s in ${SEEDS:-0 1}; do seeds+=(--seed "$s"); done
export POSTERFUSION_WEIGHTS=${POSTERFUSION_WEIGHTS:-$shared/weights}

if [ ! -d "$work/catalogue" ]; then
  "$bin/posterfusion" ingest --out "$work/catalogue" \
    --source "multilabel:$shared/data/multilabel-posters" \
    --metadata "$shared/data/metadata/imdb5000.csv" \
    --metadata "$shared/data/metadata/tmdb_movies_metadata_subset.csv"
fi
if [ ! -d "$work/moviegenre" ]; then
  "$bin/posterfusion" ingest --out "$work/moviegenre" --source "moviegenre:$shared/data/moviegenre-posters" \
    --metadata "$shared/data/metadata/imdb5000.csv" \
    --metadata "$shared/data/metadata/tmdb_movies_metadata_subset.csv"
fi
"$bin/posterfusion" features --catalogue "$work/catalogue" --out "$work/features" --detector "$detector"
"$bin/posterfusion" features --catalogue "$work/moviegenre" --out "$work/features" --detector "$detector"

"$bin/posterfusion" compare --catalogue "$work/catalogue" --features "$work/features" --models "$work/models" \
  --recipe quality --variant cnn --variant cnn+objects --variant cnn+metadata --variant fused --variant flags-only \
  "${seeds[@]}" --out "$work/compare-quality"

"$bin/posterfusion" compare --catalogue "$work/catalogue" --features "$work/features" --models "$work/models" \
  --recipe quality --recipe frozen --variant cnn --variant fused --out "$work/compare-frozen"

"$bin/posterfusion" compare --catalogue "$work/catalogue" --models "$work/models" \
  --recipe seed-densenet --recipe seed-resnet34 --recipe seed-vgg16 --recipe seed-keras-cnn --recipe seed-resnet50 \
  --out "$work/compare-seeds"

for variant in cnn fused; do
  "$bin/posterfusion" evaluate --model "$work/models/quality/$variant-s0" --catalogue "$work/moviegenre" \
    --split all --out "$work/moviegenre-$variant"
done

routed=(--catalogue "$work/catalogue" --features "$work/features" --models "$work/models" --recipe quality
        --variant cnn --variant fused "${seeds[@]}" --route-by-metadata)
"$bin/posterfusion" compare "${routed[@]}" --out "$work/compare-routed"
"$bin/posterfusion" compare "${routed[@]}" --on "$work/moviegenre" --split all --out "$work/compare-routed-mg"
