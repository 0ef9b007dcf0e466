#!/usr/bin/env bash
# The benchmark suite on a GPU machine where mlgate is installed: `mlgate bench` on ViT-B/16 (random
# init, 10 classes, batch 32, bf16 autocast) for every method, eager and with CUDA graphs
# (train.compile: reduce-overhead); the diagnostics and logging overheads in passes long enough to
# resolve a few percent; ImageNet-1k-sized CoOp within memory; where a step's time goes
# (profile_step.py); a whole trial on image files (image_trial.py).
#
#   bash benchmarks/gpu_suite.sh [quick | NAME ...]   # quick: one short bench, to check the setup
#
# Each bench's JSON and stderr land in bench-results/ (BENCH_RESULTS to change it); each runs under its
# own time limit (seconds, scaled by BENCH_TIME_SCALE), so one slow bench cannot hold up the rest.
# BENCH_DEVICE=cpu runs the same commands on the CPU (a dry run of the suite).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${BENCH_RESULTS:-bench-results}"
mkdir -p "$out"
only=" $* "
py="$(command -v python3 || command -v python)"
device="${BENCH_DEVICE:-cuda}"
export PYTHONUNBUFFERED=1
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

limit_of() { echo $(( $1 * ${BENCH_TIME_SCALE:-1} )); }
wanted() { [ "$only" = "  " ] || [[ "$only" == *" $1 "* ]]; }
bench() {  # name, time limit (s), then mlgate bench arguments
  local name="$1" limit start=$SECONDS
  wanted "$name" || return 0
  limit=$(limit_of "$2"); shift 2
  timeout "$limit" "$py" -m mlgate bench --device "$device" --json "$@" > "$out/$name.json" 2> "$out/$name.err"
  echo "$name: exit $? in $((SECONDS - start)) s (limit $limit)"
  "$py" -m json.tool "$out/$name.json" 2>/dev/null | grep -A4 '"ratios"'
}
script() {  # name, time limit (s), script, then its arguments
  local name="$1" limit
  wanted "$name" || return 0
  limit=$(limit_of "$2"); shift 2
  timeout "$limit" "$py" "$@" --device "$device" > "$out/$name.txt" 2>&1
  echo "$name: exit $?"; tail -n 3 "$out/$name.txt"
}

configs=reference,mlgate,mlgate_diagnostics,mlgate_logging
"$py" -c "import mlflow" 2>/dev/null || configs=reference,mlgate,mlgate_diagnostics
if [ "${1:-}" = quick ]; then
  only=" coop_vitb16_quick "
  bench coop_vitb16_quick 120 --method coop --backbone ViT-B-16 --steps 5 --warmup 2 --rounds 2 --configs "$configs"
  exit 0
fi
vitb=(--backbone ViT-B-16 --steps 30 --warmup 5 --rounds 3)
graphs=("${vitb[@]}" --configs reference,mlgate --compile reduce-overhead)  # compiling takes most of a run
for method in coop cocoop maple bimaple adaptive_bimaple adapt; do
  bench "${method}_vitb16_cudagraphs" 150 --method "$method" "${graphs[@]}"
  bench "${method}_vitb16" 90 --method "$method" "${vitb[@]}" --configs "$configs"
done
# A graphed CoOp step takes a few ms: 200-step passes resolve a few percent of overhead.
bench coop_vitb16_cudagraphs_overheads 240 --method coop --backbone ViT-B-16 --steps 200 --warmup 10 --rounds 5 \
  --configs "$configs" --compile reduce-overhead
bench coop_tiny_cudagraphs 90 --method coop --steps 100 --warmup 10 --rounds 3 --configs reference,mlgate --compile reduce-overhead
imagenet=(--method coop --backbone ViT-B-16 --classes 1000 --steps 2 --warmup 1 --rounds 1
          --set method.n_ctx=16 --set method.ctx_init=null --name-words 6)
bench coop_imagenet1k_b32 90 "${imagenet[@]}" --batch 32 --configs mlgate
bench coop_imagenet1k_reference_b1 90 "${imagenet[@]}" --batch 1 --configs reference
for method in coop adapt; do
  script "profile_${method}_vitb16_cudagraphs" 120 benchmarks/profile_step.py --method "$method" --backbone ViT-B-16 \
    --compile reduce-overhead
done
script maple_vitb16_image_files 120 benchmarks/image_trial.py --method maple --backbone ViT-B-16 --steps 100 \
  --root /tmp/image-trial-data
