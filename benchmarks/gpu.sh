#!/usr/bin/env bash
# The GPU check of issue 16, in one command (budget: under 8 minutes on one GPU):
#
#   benchmarks/gpu.sh                         # --device cuda: writes benchmarks/results/speed_cuda.md
#   benchmarks/gpu.sh --device cpu --quick    # the same steps on a CPU, smaller (smoke run)
#
# 1. the GPU-relevant tests with --device (flow harness, VAE, guides, Trainer incl. the
#    no-host-sync test of a Trainer step, data-parallel tests);
# 2. one VAE training step (K = 16 planar, K = 8 O-SNF; batch 100 and 1000) against the same
#    VAE from Pyro's conditional transforms, and AutoFlowGuide SVI steps against Pyro's flow
#    autoguides: benchmarks/speed.py --sections vae guides;
# 3. the MNIST paper configuration (gated-conv encoder/decoder, O-SNF K = 16, Adamax lr 5e-4,
#    batch 100) trained for a fixed number of epochs by `python -m pyroflows vae`, timed, on
#    the embedded static-MNIST sample or --data-dir DIR (e.g. ../shared/data).
#
# Options: --device DEV (default cuda), --quick, --epochs N (step 3; default 10, quick 1),
# --data-dir DIR, --output FILE (default benchmarks/results/speed_<device>.md for a GPU,
# outputs/gpu-check/speed_<device>.md otherwise, so a CPU smoke run never overwrites the
# committed CPU results). Each step's log goes to the output's directory; the script stops at
# the first failing step.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
QUICK=0
EPOCHS=""
DATA_DIR=""
OUTPUT=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --epochs) EPOCHS="$2"; shift 2 ;;
        --data-dir) DATA_DIR="$2"; shift 2 ;;
        --output) OUTPUT="$2"; shift 2 ;;
        *) echo "gpu.sh: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
KIND="${DEVICE%%:*}"
if [[ -z "$OUTPUT" ]]; then
    if [[ "$KIND" == "cpu" ]]; then OUTPUT="outputs/gpu-check/speed_${KIND}.md"
    else OUTPUT="benchmarks/results/speed_${KIND}.md"; fi
fi
LOGS="$(dirname "$OUTPUT")/gpu-check-logs"
mkdir -p "$LOGS"
EPOCHS="${EPOCHS:-$([[ $QUICK == 1 ]] && echo 1 || echo 10)}"
START=$SECONDS
if [[ "$KIND" == "cpu" ]]; then export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"; fi
stamp() { echo "[gpu.sh $((SECONDS - START)) s] $*"; }

# 1. tests ------------------------------------------------------------------------------
TESTS=(tests/test_transforms.py tests/test_vae.py tests/test_guides.py tests/test_infer.py
       tests/test_distributed.py)
[[ $QUICK == 1 ]] && TESTS=(tests/test_vae.py tests/test_infer.py tests/test_distributed.py)
stamp "tests on $DEVICE: ${TESTS[*]}"
python -m pytest "${TESTS[@]}" --device "$DEVICE" -q -p no:cacheprovider -x \
    2>&1 | tee "$LOGS/tests.log" | tail -3

# 2. VAE and autoguide steps against Pyro -----------------------------------------------
SPEED=(--device "$DEVICE" --sections vae guides --output "$OUTPUT")
[[ $QUICK == 1 ]] && SPEED+=(--quick)
[[ "$KIND" == "cpu" ]] && SPEED+=(--threads 1)  # a busy CPU: 2 threads/process thrash
stamp "python benchmarks/speed.py ${SPEED[*]}"
python benchmarks/speed.py "${SPEED[@]}" 2>&1 | tee "$LOGS/speed.log" | grep -E "^(VAE|guide|wrote)"

# 3. the MNIST paper configuration for a fixed number of epochs -------------------------
TRAIN_DIR="$LOGS/mnist"
TRAIN=(vae --device "$DEVICE" --architecture conv --flow sylvester-orthogonal --num-flows 16
       --optimizer adamax --lr 5e-4 --batch-size 100 --warmup 100 --patience 100
       --epochs "$EPOCHS" --no-progress --output-dir "$TRAIN_DIR")
if [[ $QUICK == 1 ]]; then TRAIN+=(--num-samples 10 --test-subset 50)
else TRAIN+=(--num-samples 1000); fi
[[ -n "$DATA_DIR" ]] && TRAIN+=(--data-dir "$DATA_DIR")
stamp "python -m pyroflows ${TRAIN[*]}"
python -m pyroflows "${TRAIN[@]}" 2>&1 | tee "$LOGS/train.log" | tail -2

python - "$OUTPUT" "$TRAIN_DIR/results.json" "$LOGS/train.log" "python -m pyroflows ${TRAIN[*]}" <<'EOF'
import json
import re
import statistics
import sys
from pathlib import Path

out, results = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
rows = int(re.search(r"train (\d+)", Path(sys.argv[3]).read_text()).group(1))
per_epoch = statistics.median(r["seconds"] for r in results["history"])
lines = [
    "",
    "## 6. The MNIST paper configuration, a fixed number of epochs",
    "",
    f"`{sys.argv[4]}`: gated-conv encoder and decoder, O-SNF K = 16, Adamax lr 5e-4, batch"
    f" 100, {results['parameters']:,} parameters, {rows:,} training images; s/epoch includes"
    " the validation pass.",
    "",
    "| epochs | train s | s/epoch (median) | train images/s | test −ELBO | test NLL (IS) | test rows |",
    "|---|---|---|---|---|---|---|",
    f"| {results['epochs_run']} | {results['train_seconds']:.1f} | {per_epoch:.2f} |"
    f" {rows / per_epoch:.0f} | {-results['test_elbo']:.2f} |"
    f" {-results['test_log_likelihood']:.2f} | {results['num_test']} |",
    "",
]
out.write_text(out.read_text() + "\n".join(lines))
print(f"appended the training row to {out}")
EOF
stamp "done: $OUTPUT"
