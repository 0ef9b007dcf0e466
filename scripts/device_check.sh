#!/usr/bin/env bash
# Issue 9's GPU checks in one run on the lent GPU machine, open questions first, each under its
# own time limit and all within DEVICE_BUDGET_S seconds (default 420), so one slow bench cannot
# take the others' time. Prepare the wheels first (scripts/device_wheels.sh) and carry .wheels.
#   - ViT-B/16 speed-ups and GPU peak memory (bf16 autocast): the README's GPU table first (CoOp,
#     CoCoOp, MaPLe, AdaptiveBiMaPLe with CUDA graphs, i.e. train.compile: reduce-overhead; the
#     diagnostics and MLflow logging overheads under CUDA graphs in 200-step passes; where the
#     embedded backbone's graphed step spends its host time; coop eager; adapt with CUDA graphs),
#     then the other methods eager, the embedded backbone, coop compiled in the default mode;
#   - CoOp on ImageNet-1k's 1,000 classes at batch 32 within 16 GB, and the reference at batch 1;
#   - where the step's time goes (scripts/profile_step.py), eager and with CUDA graphs;
#   - a whole MaPLe trial on JPEG files (scripts/image_trial.py).
# Usage: device_check.sh [quick | NAME...]   (quick: one method, fewer steps, to check the setup;
# NAMEs: only those benches, e.g. coop_vitb16 cocoop_vitb16). Results: device-results/, and all of
# them in one archive, $OUT/device-results.tgz (the device tool returns at most 8 files).
# MLGATE_BENCH_DEVICE=cpu runs the same commands on the CPU (a dry run of the setup, here).
set -uo pipefail
cd "$(dirname "$0")/.."
out=device-results
rm -rf "$out" && mkdir -p "$out"
[ -n "${OUT:-}" ] && trap 'tar czf "$OUT/device-results.tgz" "$out"' EXIT
only=" $* "
py="$(command -v python3 || command -v python)"  # the GPU image's torch is under python3
rm -rf .deps
"$py" -m pip install -q --no-index --no-deps --target .deps .wheels/*.whl || exit 1
export PYTHONPATH="$PWD/.deps:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_LOGS="${TORCH_LOGS:-perf_hints}"  # into each .err: why inductor would skip CUDA graphs
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
deadline=$((SECONDS + ${DEVICE_BUDGET_S:-420}))
wanted() {  # name, time limit (s): whether to run it (asked for, and budget left); sets $limit
  if [ "$only" != "  " ] && [[ "$only" != *" $1 "* ]]; then return 1; fi
  local left=$((deadline - SECONDS))
  if [ "$left" -lt 20 ]; then echo "$1: skipped (budget spent)"; return 1; fi
  limit=$(($2 < left ? $2 : left))
}
bench() {  # name, time limit (s), then mlgate bench arguments
  local name="$1" limit start=$SECONDS
  wanted "$1" "$2" || return 0; shift 2
  timeout "$limit" "$py" -m mlgate bench --device "${MLGATE_BENCH_DEVICE:-cuda}" --json "$@" \
    > "$out/$name.json" 2> "$out/$name.err"
  echo "$name: exit $? in $((SECONDS - start)) s (limit $limit)"
  tail -c 300 "$out/$name.err"; "$py" -m json.tool "$out/$name.json" 2>/dev/null | grep -A4 '"ratios"\|"gpu"'
}
profile() {  # name, time limit (s), then scripts/profile_step.py arguments
  local name="$1" limit
  wanted "$1" "$2" || return 0; shift 2
  timeout "$limit" "$py" scripts/profile_step.py --device "${MLGATE_BENCH_DEVICE:-cuda}" "$@" > "$out/$name.txt" 2>&1
  echo "$name: exit $?"; grep -m1 "ms/step" "$out/$name.txt"
}
image_trial() {  # name, time limit (s), then scripts/image_trial.py arguments
  local name="$1" limit
  wanted "$1" "$2" || return 0; shift 2
  timeout "$limit" "$py" scripts/image_trial.py --device "${MLGATE_BENCH_DEVICE:-cuda}" --root /tmp/image-trial-data \
    "$@" > "$out/$name.txt" 2>&1
  echo "$name: exit $?"; grep -m1 "a trial" "$out/$name.txt"
}
configs=reference,mlgate,mlgate_diagnostics,mlgate_logging
"$py" -c "import mlflow" 2>/dev/null || configs=reference,mlgate,mlgate_diagnostics
if [ "${1:-}" = quick ]; then
  only=" coop_vitb16_quick "
  bench coop_vitb16_quick 120 --method coop --backbone ViT-B-16 --steps 5 --warmup 2 --rounds 2 --configs "$configs"
  exit 0
fi
vitb=(--backbone ViT-B-16 --steps 30 --warmup 5 --rounds 3 --configs "$configs")
# CUDA graphs: compiled forward and backward replayed as graphs. One compiled configuration against
# the eager reference each, for compiling takes most of such a run (the overheads row compiles three).
graphs=(--backbone ViT-B-16 --steps 30 --warmup 5 --rounds 3 --configs reference,mlgate --compile reduce-overhead)
for method in coop cocoop maple adaptive_bimaple; do
  bench "${method}_vitb16_cudagraphs" 150 --method "$method" "${graphs[@]}"
done
# A graphed step takes ~2.5 ms: 30-step passes (75 ms) are too short to resolve 2%, so longer ones.
bench coop_vitb16_cudagraphs_overheads 240 --method coop --backbone ViT-B-16 --steps 200 --warmup 10 --rounds 5 \
  --configs "$configs" --compile reduce-overhead
profile profile_coop_tiny_cudagraphs 90 --method coop --backbone mlgate-tiny --compile reduce-overhead
bench coop_tiny_cudagraphs 90 --method coop --steps 100 --warmup 10 --rounds 3 --configs reference,mlgate --compile reduce-overhead
bench coop_vitb16 75 --method coop "${vitb[@]}"
bench adapt_vitb16_cudagraphs 150 --method adapt "${graphs[@]}"
# A whole MaPLe trial on JPEG files (read in parallel, one step ahead): is a real dataset's trial
# bound by decoding? (Its steps/s against the bench's maple_vitb16 row.)
image_trial maple_vitb16_image_files 120 --method maple --backbone ViT-B-16 --steps 100
profile profile_coop_vitb16_cudagraphs 120 --method coop --backbone ViT-B-16 --compile reduce-overhead
imagenet=(--method coop --backbone ViT-B-16 --classes 1000 --steps 2 --warmup 1 --rounds 1
          --set method.n_ctx=16 --set method.ctx_init=null --name-words 6)
bench coop_imagenet1k_b32 90 "${imagenet[@]}" --batch 32 --configs mlgate
bench coop_imagenet1k_reference_b1 90 "${imagenet[@]}" --batch 1 --configs reference
for method in maple adaptive_bimaple adapt cocoop; do
  bench "${method}_vitb16" 90 --method "$method" "${vitb[@]}"
done
bench coop_tiny 60 --method coop --steps 100 --warmup 10 --rounds 3 --configs "$configs"
bench coop_vitb16_compiled 180 --method coop "${vitb[@]}" --compile
for method in coop cocoop adapt; do
  profile "profile_${method}_vitb16" 60 --method "$method" --backbone ViT-B-16
done
for method in cocoop adapt; do
  profile "profile_${method}_vitb16_cudagraphs" 120 --method "$method" --backbone ViT-B-16 --compile reduce-overhead
done
