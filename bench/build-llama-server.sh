#!/usr/bin/env bash
# Builds llama.cpp's llama-server (the benchmark's reference server) in the project's build folder,
# from the same pinned llama.cpp and with the same options (CPU or CUDA) as the addon:
# CMakeLists.txt configures llama.cpp's tools EXCLUDE_FROM_ALL, so they are built on demand.
#   bench/build-llama-server.sh            -> build/bin/llama-server
# Needs a configured build/ (npm ci or npm run build did that). BUILD_DIR and JOBS override.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
JOBS=${JOBS:-$(nproc)}
if [ ! -f "$BUILD_DIR/CMakeCache.txt" ]; then
  echo "build-llama-server: $BUILD_DIR/CMakeCache.txt missing: run npm ci (or npm run build) first" >&2
  exit 1
fi
cmake --build "$BUILD_DIR" --config Release --target llama-server -j "$JOBS"
ls -l "$BUILD_DIR/bin/llama-server"
