#!/usr/bin/env bash
# Wheels of what `python -m mlgate bench` imports beyond torch and torchvision, for the lent GPU
# machine (Python 3.12, torch and torchvision installed, no package registry). They land in .wheels/
# (git-ignored), which the device call carries (64 MiB at most; this set is about 20 MiB):
#   bash scripts/device_wheels.sh            # here, where the registry is reachable
#   device run: bash scripts/device_check.sh   with carry [".wheels"]
# MLflow comes as mlflow-skinny (the tracking client and SQL store, without the UI's files) with
# SQLAlchemy and Alembic, so the bench's mlgate_logging configuration runs there too.
# Usage: device_wheels.sh [PYTHON_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-3.12}"
packages=(
  open_clip_torch timm huggingface_hub hf-xet httpx2 httpcore2 anyio idna h11 truststore click
  safetensors regex ftfy wcwidth tqdm pyyaml packaging
  pydantic pydantic_core annotated-types typing-inspection typing_extensions
  psutil nvidia-ml-py rich markdown-it-py mdurl pygments
  # MLflow's tracking client on a SQLite store (mlgate_logging)
  mlflow-skinny sqlalchemy alembic mako markupsafe cachetools cloudpickle databricks-sdk google-auth
  pyasn1 pyasn1-modules cryptography cffi pycparser fastapi starlette annotated-doc uvicorn gitpython
  gitdb smmap importlib-metadata zipp opentelemetry-api opentelemetry-sdk opentelemetry-proto
  opentelemetry-semantic-conventions protobuf python-dotenv requests urllib3 certifi charset-normalizer
  sqlparse
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
