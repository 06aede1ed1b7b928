#!/usr/bin/env bash
# The worked example of docs/forget.md: forget 20 images, then one image, from a model trained on
# an image folder, and verify both against held-out images.
#
#   bash examples/forget_image_folder.sh [WORKDIR]
#
# Sizes come from N_TRAIN (default 1000), N_HOLDOUT (2000) and EPOCHS (40); PYTHON picks the
# interpreter (default python3, with deepclean installed or on PYTHONPATH). Exit status: 0 when
# every command ran (each deepclean command's own status, 0 verified or 3 not verified, is
# printed), otherwise the first failing status.
set -euo pipefail
# One CPU thread everywhere (the training step and every deepclean command, which also get
# --threads 1): floating-point sums depend on the thread count, and the output shown in
# docs/forget.md is that of one thread.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
WORK=${1:-forget-example}
PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
COMMON=(--model "$HERE/fashion_model.py:make_model" --data "$WORK/train"
        --holdout "$WORK/holdout" --grayscale --threads 1)

"$PYTHON" "$HERE/forget_image_folder.py" "$WORK" --n-train "${N_TRAIN:-1000}" \
    --n-holdout "${N_HOLDOUT:-2000}" --epochs "${EPOCHS:-40}"

run() {  # run a deepclean command; 0 (verified) and 3 (not verified) are results, not failures
    local status=0
    echo "+ deepclean $*"
    "$PYTHON" -m deepclean "$@" || status=$?
    echo "exit status $status"
    if [ "$status" -ne 0 ] && [ "$status" -ne 3 ]; then exit "$status"; fi
}

# The model before unlearning, checked against itself: it still remembers the 20 images.
run verify "${COMMON[@]}" --weights "$WORK/model.pt" --unlearned "$WORK/model.pt" \
    --forget "$WORK/forget_20.txt"
# Forget 20 images (DeepClean, gamma chosen on the held-out images), then one image.
run forget "${COMMON[@]}" --weights "$WORK/model.pt" --forget "$WORK/forget_20.txt" \
    --out "$WORK/forget-20"
run forget "${COMMON[@]}" --weights "$WORK/model.pt" --forget "$WORK/forget_1.txt" \
    --out "$WORK/forget-1"
# Anyone holding the weights can re-check a result later, and that the audit record names them.
run verify "${COMMON[@]}" --weights "$WORK/model.pt" \
    --unlearned "$WORK/forget-20/unlearned.safetensors" --forget "$WORK/forget_20.txt" \
    --audit "$WORK/forget-20/audit.json"
