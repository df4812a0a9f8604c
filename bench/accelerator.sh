#!/usr/bin/env bash
# One accelerator check: the figures of docs/benchmarks.md that need a GPU or TPU, in at most
# 8 minutes on one GPU. Run from anywhere:
#
#     bench/accelerator.sh            # on the accelerator
#     bench/accelerator.sh --quick    # toy sizes, a smoke test that runs on a CPU too
#                                     # (also HSCL_BENCH_QUICK=1)
#
# Prints, section by section: the devices; the ResNet-50 bf16 train step (images/s, TFLOP/s per
# device and bf16 utilisation) at global batch 256 and 1024, on a mesh and under pmap
# (bench/train_step.py); the device-augmentation pipeline/step ratio on random CIFAR-shaped uint8
# images (bench/train_step.py --augment); the loss forward+backward at 2B = 8192, dense and blocked
# (bench/losses.py); the wall time of the default digits run (train.py with configs/default.py),
# skipped with the reason where TensorFlow is missing (building the digits dataset needs it).
# Each section has its own time limit, so that a slow one cannot take the others' time; a section
# that fails prints its exit status and the script goes on. Needs jax, flax, optax, chex and
# orbax only (no TensorFlow but for the digits run). PYTHON picks the interpreter.
set -u
cd "$(dirname "$0")/.." || exit 1
quick="${HSCL_BENCH_QUICK:-0}"
if [[ "${1:-}" == "--quick" ]]; then
  quick=1
fi
python="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT

# The whole check ends within 8 minutes: each section's limit is cut to what is left of that.
deadline=$(($(date +%s) + 470))

section() { # section TITLE SECONDS COMMAND...: runs COMMAND within SECONDS, then its wall time
  local title="$1" limit="$2"
  shift 2
  local left=$((deadline - $(date +%s)))
  ((left < limit)) && limit=$left
  echo
  echo "== $title"
  if ((limit <= 0)); then
    echo "-- $title: skipped, the check's 8 minutes are spent"
    return
  fi
  local start status
  start="$(date +%s.%N)"
  timeout "$limit" "$@"
  status=$?
  local took
  took="$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')"
  if [[ $status -eq 0 ]]; then
    echo "-- $title: ${took} s"
  elif [[ $status -eq 124 ]]; then
    echo "-- $title: stopped at its time limit of ${limit} s"
  else
    echo "-- $title: failed with exit status $status after ${took} s"
  fi
}

if [[ "$quick" == 1 ]]; then
  step_case=(--cases=small_cnn --steps=1 --repeats=1)
  batches=(16 32)
  augment=(--augment-model=small_cnn --augment-batch=16 --steps=1 --repeats=1)
  loss_sizes=(256)
  digits_flags=(--config.num_steps=4 --config.eval_every_steps=0 --config.model.width=4
    --config.global_batch_size=16 --config.knn.k=10)
else
  step_case=(--cases=resnet50 --dtype=bfloat16 --steps=10 --repeats=3)
  batches=(256 1024)
  augment=(--augment-model=resnet50 --dtype=bfloat16 --augment-batch=256 --steps=10 --repeats=3)
  loss_sizes=(8192)
  digits_flags=()
fi

echo "accelerator check ($([[ "$quick" == 1 ]] && echo quick || echo full)), $(date -u '+%Y-%m-%d %H:%M UTC')"
section "devices" 60 "$python" -c \
  "import jax; print('jax', jax.__version__, jax.default_backend(), jax.devices())"

# A larger batch compiles for longer (convolution autotuning): its own limit.
limits=(150 270)
for i in "${!batches[@]}"; do
  section "train step, global batch ${batches[$i]}, mesh and pmap" "${limits[$i]}" \
    "$python" bench/train_step.py "${step_case[@]}" --batch="${batches[$i]}"
done

section "device augmentation: pipeline / step" 90 \
  "$python" bench/train_step.py --cases= --augment "${augment[@]}"

section "loss forward+backward at 2B = ${loss_sizes[*]}, dense and blocked" 45 \
  "$python" bench/losses.py --sizes "${loss_sizes[@]}" --no-memory --repeats=3 --hardening-views=0

# The digits run, as a script of its own so that `timeout` can stop it: $1 python, $2 workdir,
# then train.py's extra flags.
digits_run='
python="$1" workdir="$2"
shift 2
if ! "$python" -c "import tensorflow, tensorflow_datasets, sklearn" 2>/dev/null; then
  echo "skipped: TensorFlow, tensorflow_datasets or scikit-learn is not installed, and building"
  echo "the digits dataset (hscl_jax.data.digits_builder) needs them"
  exit 0
fi
"$python" train.py --config=configs/default.py --workdir="$workdir/digits" "$@" \
  2>"$workdir/digits.log"
status=$?
tail -n 2 "$workdir/digits.log"
"$python" -c "
import json, sys
knn = [r for r in map(json.loads, open(sys.argv[1])) if \"knn_top1\" in r]
print(\"final knn_top1\", knn[-1][\"knn_top1\"], \"at step\", knn[-1][\"step\"])
" "$workdir/digits/metrics.jsonl"
exit $status
'
section "default digits run (python train.py --config=configs/default.py)" 90 \
  bash -c "$digits_run" digits "$python" "$workdir" "${digits_flags[@]}"
