#!/usr/bin/env bash
# Packs what the GPU machine lacks into the ignored folder .carry/ (carry it as ".carry"):
# that machine has CUDA, cmake, g++ and python3 but no Node.js, no npm registry and no internet,
# and receives only the working tree (tracked + untracked-not-ignored files) plus carried paths,
# 64 MiB in all. bench/gpu.sh unpacks these.
#
#   .carry/node.xz               this machine's node binary, xz-compressed
#   .carry/node_modules.tar.xz   production dependencies (npm ci --omit=dev --ignore-scripts in a
#                                temp copy): fastify, sharp + its prebuilt libvips (@img/*),
#                                prom-client, @fastify/multipart, node-addon-api, cmake-js (whose
#                                node-api-headers is all cmake-js needs, as package.json sets
#                                binary.napi_versions: no Node headers download)
#   .carry/dist.tar.xz           the compiled TypeScript (tsc -p .), incl. dist/bench and the generator
#   .carry/llama.cpp.tar.xz      deps/llama.cpp without what the build does not read (see EXCLUDES)
#   .carry/manifest.txt          versions, sizes, sha256
#
# Usage: bench/pack-gpu.sh     (run from anywhere; needs npm ci done here, xz, and the npm cache
#                               or registry for the production install)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
CARRY="$ROOT/.carry"
LIMIT_MIB=${LIMIT_MIB:-64}
XZ="xz -T0 -6"
log() { printf '[pack-gpu %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

[ -f deps/llama.cpp/.caprl-pin ] || { echo "pack-gpu: deps/llama.cpp missing: run npm ci first" >&2; exit 1; }
[ -x node_modules/.bin/tsc ] || { echo "pack-gpu: node_modules missing: run npm ci first" >&2; exit 1; }
mkdir -p "$CARRY"
rm -f "$CARRY"/dist.tar.xz "$CARRY"/node_modules.tar.xz "$CARRY"/llama.cpp.tar.xz "$CARRY"/manifest.txt
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

NODE_BIN=$(command -v node)
NODE_SUM=$(sha256sum "$NODE_BIN" | cut -d' ' -f1)
if [ -f "$CARRY/node.xz" ] && [ "$(cat "$CARRY/node.sha256" 2>/dev/null)" = "$NODE_SUM" ]; then
  log "node $(node --version) from $NODE_BIN: .carry/node.xz is current"
else
  log "node $(node --version) from $NODE_BIN (xz takes a minute or two)"
  rm -f "$CARRY/node.xz" "$CARRY/node.sha256"
  $XZ -c "$NODE_BIN" > "$CARRY/node.xz.tmp" && mv "$CARRY/node.xz.tmp" "$CARRY/node.xz"
  echo "$NODE_SUM" > "$CARRY/node.sha256"
fi

log "compiling TypeScript"
node node_modules/typescript/bin/tsc -p .
tar -cf - dist | $XZ > "$CARRY/dist.tar.xz"

log "production node_modules (npm ci --omit=dev --ignore-scripts)"
cp package.json package-lock.json "$TMP/"
(cd "$TMP" && npm ci --omit=dev --ignore-scripts --prefer-offline --no-audit --no-fund --loglevel=error >/dev/null)
for m in fastify sharp prom-client @fastify/multipart node-addon-api cmake-js node-api-headers; do
  [ -d "$TMP/node_modules/$m" ] || { echo "pack-gpu: $m missing from the production install" >&2; exit 1; }
done
(cd "$TMP" && node -e "require('sharp'); console.log('sharp loads: libvips', require('sharp').versions.vips)")
tar -C "$TMP" -cf - node_modules | $XZ > "$CARRY/node_modules.tar.xz"

# llama.cpp: everything its CMake configure + the addon/llama-server/mtmd build read; dropped:
# git history, vocab models, docs, media, tests/examples/pocs/benches/app (their options are OFF),
# gguf-py, ci, the web UI's sources (LLAMA_BUILD_UI=OFF: ui-assets.cmake writes a placeholder).
EXCLUDES=(.git models docs media tests examples pocs benches app gguf-py ci tools/ui/src tools/ui/tests
  tools/mtmd/test-1.jpeg tools/mtmd/test-2.mp3 tools/mtmd/test-3.mp4)
log "llama.cpp source ($(cat deps/llama.cpp/.caprl-pin | awk '{print $NF}' | cut -c1-10)), trimmed"
tar -C deps -cf - "${EXCLUDES[@]/#/--exclude=llama.cpp/}" llama.cpp | $XZ > "$CARRY/llama.cpp.tar.xz"

TREE_BYTES=$(git ls-files -z -co --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
CARRY_BYTES=$(du -cb "$CARRY"/*.xz | tail -1 | cut -f1)
TOTAL=$((TREE_BYTES + CARRY_BYTES))
{
  echo "packed $(date -u +%FT%TZ) on $(hostname) from $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "node $(node --version)"
  echo "llama.cpp $(cat deps/llama.cpp/.caprl-pin)"
  echo "working tree bytes $TREE_BYTES"
  (cd "$CARRY" && for f in *.xz; do printf '%s %s %s\n' "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -c1-16)" "$f"; done)
  echo "total bytes $TOTAL (limit $((LIMIT_MIB * 1048576)))"
} > "$CARRY/manifest.txt"
cat "$CARRY/manifest.txt"
if [ "$TOTAL" -gt $((LIMIT_MIB * 1048576 * 95 / 100)) ]; then
  echo "pack-gpu: $((TOTAL / 1048576)) MiB is too close to the ${LIMIT_MIB} MiB limit" >&2
  exit 1
fi
log "done: carry .carry ($((CARRY_BYTES / 1048576)) MiB) with a $((TREE_BYTES / 1048576)) MiB tree; then run bench/gpu.sh there"
