#!/usr/bin/env bash
# Issue 9's GPU checks in one run on the lent GPU machine; each result is a JSON file in $OUT
# (or ./device-results). Prepare the wheels first (scripts/device_wheels.sh) and carry .wheels.
#   - ViT-B/16 speed-ups and GPU peak memory, coop and the deep-prompt methods (bf16 autocast);
#   - CoOp on ImageNet-1k's 1,000 classes at batch 32 within 16 GB, and the reference at batch 1.
# Usage: device_check.sh [quick]   (quick: one method, fewer steps; to check the setup)
# MLGATE_BENCH_DEVICE=cpu runs the same commands on the CPU (a dry run of the setup, here).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-device-results}"
mkdir -p "$out"
rm -rf .deps
python -m pip install -q --no-index --no-deps --target .deps .wheels/*.whl || exit 1
export PYTHONPATH="$PWD/.deps:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
bench() {  # name, then mlgate bench arguments
  local name="$1"; shift
  local start=$SECONDS
  python -m mlgate bench --device "${MLGATE_BENCH_DEVICE:-cuda}" --json "$@" > "$out/$name.json" 2> "$out/$name.err"
  echo "$name: exit $? in $((SECONDS - start)) s"
  tail -c 400 "$out/$name.json"; echo
}
configs=reference,mlgate,mlgate_diagnostics
if [ "${1:-}" = quick ]; then
  bench coop_vitb16_quick --method coop --backbone ViT-B-16 --steps 5 --warmup 2 --rounds 2 --configs "$configs"
  exit 0
fi
for method in coop cocoop maple adaptive_bimaple adapt; do
  bench "${method}_vitb16" --method "$method" --backbone ViT-B-16 --steps 20 --warmup 3 --rounds 3 --configs "$configs"
done
bench coop_vitb16_compiled --method coop --backbone ViT-B-16 --steps 20 --warmup 3 --rounds 3 --configs "$configs" --compile
imagenet=(--method coop --backbone ViT-B-16 --classes 1000 --steps 2 --warmup 1 --rounds 1
          --set method.n_ctx=16 --set method.ctx_init=null --name-words 6)
bench coop_imagenet1k_b32 "${imagenet[@]}" --batch 32 --configs mlgate
bench coop_imagenet1k_reference_b1 "${imagenet[@]}" --batch 1 --configs reference
