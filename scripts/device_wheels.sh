#!/usr/bin/env bash
# Wheels of what `python -m mlgate bench` imports beyond torch and torchvision, for the lent GPU
# machine (Python 3.12, torch and torchvision installed, no package registry). They land in .wheels/
# (git-ignored), which the device call carries (64 MiB at most; this set is about 20 MiB):
#   bash scripts/device_wheels.sh            # here, where the registry is reachable
#   device run: bash scripts/device_check.sh   with carry [".wheels"]
# MLflow is not among them (its server stack is far above the carry limit), so the device check
# benchmarks every configuration but mlgate_logging. Usage: device_wheels.sh [PYTHON_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-3.12}"
packages=(
  open_clip_torch timm huggingface_hub hf-xet httpx2 httpcore2 anyio idna h11 truststore click
  safetensors regex ftfy wcwidth tqdm pyyaml packaging
  pydantic pydantic_core annotated-types typing-inspection typing_extensions
  psutil nvidia-ml-py rich markdown-it-py mdurl pygments
)
rm -rf .wheels && mkdir .wheels
# The versions this checkout's environment runs (tested), where it has them; the newest otherwise.
pins=()
for p in "${packages[@]}"; do
  v="$(python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p" 2>/dev/null || true)"
  pins+=("${p}${v:+==$v}")
done
python -m pip download -q --no-deps --only-binary=:all: --dest .wheels --python-version "$version" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any "${pins[@]}"
du -sh .wheels
