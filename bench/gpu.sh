#!/usr/bin/env bash
# One-shot GPU run, in one device call of under 10 minutes: unpack what bench/pack-gpu.sh carried
# (.carry/), build the CUDA addon + llama-server + llama-mtmd-cli, generate the CapRL-3B-shaped
# model, check our image kernels against their CPU reference, benchmark caprl (with llama.cpp's
# and with our vision encoder) and llama-server side by side, then, in the AFTER_BENCH seconds
# kept for them, print the KV cache sizing, compare our vision encoder with clip, time the sampler
# and compare our image patches with transformers'. Results (at most 8 files) go to $OUT:
#   gpu.log (this log, with timestamps), build.log, gpu-check.txt, server-logs.txt,
#   bench-<preset>-<dtype>.json and .md per dtype
# and a short table is printed last.
#
#   bench/gpu.sh                 on the GPU machine (working tree + carried .carry, run from anywhere)
#   bench/gpu.sh --skip-build    a second call on a still-warm machine: reuse build/ and the models
#   bench/gpu.sh --build-only    only unpack and build (for a split run: build, then --skip-build)
#   bench/gpu.sh --dry-run       here, on the CPU: the tiny model, no CUDA; checks the carried
#                                archives (unpacked into a temp folder, a cmake configure of the
#                                trimmed llama.cpp), reuses the local build, runs the rest small
#
# Environment: OUT (results; default $WORK/out), WORK (scratch; default /tmp/caprl-gpu, or
# /tmp/caprl-gpu-dry), BUDGET (seconds for the whole script, default 570), JOBS (default nproc),
# CAPRL_CUDA_ARCHS (default 90a), BENCH_CONCURRENCY (1,32,8,64), BENCH_REQUESTS (4,32,16,64),
# BENCH_TOKENS (256), BENCH_SIZES (1024x1024), BENCH_DTYPES (f16; e.g. f16,q8_0),
# LLAMA_SERVER (a llama-server binary to use instead of build/bin/llama-server), SKIP_GPU_CHECK=1,
# BENCH_CAPRL_VISION=0 (benchmark caprl with llama.cpp's vision encoder only), AFTER_BENCH (120).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DRY=0 SKIP_BUILD=0 BUILD_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --skip-build) SKIP_BUILD=1 ;;
    --build-only) BUILD_ONLY=1 ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

BUDGET=${BUDGET:-570}
JOBS=${JOBS:-$(nproc)}
ARCHS=${CAPRL_CUDA_ARCHS:-90a}
if [ "$DRY" = 1 ]; then
  WORK=${WORK:-/tmp/caprl-gpu-dry}
  PRESET=tiny
  CONC=${BENCH_CONCURRENCY:-1,4}
  REQS=${BENCH_REQUESTS:-4}
  TOKENS=${BENCH_TOKENS:-16}
  SIZES=${BENCH_SIZES:-448x448,1024x1024}
  DTYPES=${BENCH_DTYPES:-f16}
else
  WORK=${WORK:-/tmp/caprl-gpu}
  PRESET=caprl-3b
  # Issue 8's levels (1 and 32) first, so that a run cut short by its deadline still has them.
  CONC=${BENCH_CONCURRENCY:-1,32,8,64}
  REQS=${BENCH_REQUESTS:-4,32,16,64}
  TOKENS=${BENCH_TOKENS:-256}
  SIZES=${BENCH_SIZES:-1024x1024}
  DTYPES=${BENCH_DTYPES:-f16}
fi
OUT=${OUT:-$WORK/out}
mkdir -p "$OUT" "$WORK"
CARRY="$ROOT/.carry"
COMMIT=$(grep -o '"commit": *"[0-9a-f]*"' "$ROOT/scripts/llama-pin.json" | grep -o '[0-9a-f]\{40\}')

log() { printf '[gpu.sh %s +%3ds] %s\n' "$(date -u +%H:%M:%S)" "$SECONDS" "$*"; }
phase() { echo; log "== $*"; }
left() { echo $((BUDGET - SECONDS)); }
left1() { local l=$((BUDGET - SECONDS)); [ $l -lt 1 ] && l=1; echo $l; }  # for timeout(1), where 0 = none
STATUS=0
fail() { log "FAILED: $*"; STATUS=1; }

unpack_node() { # $1 = folder that gets bin/node
  mkdir -p "$1/bin"
  xz -dc "$CARRY/node.xz" > "$1/bin/node" && chmod +x "$1/bin/node"
}

main() {
  phase "machine ($([ "$DRY" = 1 ] && echo dry run || echo GPU run), budget ${BUDGET}s, out $OUT)"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  else
    log "no nvidia-smi: no GPU here"
  fi
  log "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB"
  NVCC=$(command -v nvcc || { [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda/bin/nvcc; } || true)
  if [ -n "$NVCC" ] && ! command -v nvcc >/dev/null 2>&1; then
    export PATH="$(dirname "$NVCC"):$PATH" CUDACXX="$NVCC"  # for CMake's CUDA detection too
    log "nvcc not on PATH: using $NVCC"
  fi
  log "$(cmake --version | head -1); $(g++ --version | head -1); nvcc: $([ -n "$NVCC" ] && "$NVCC" --version | tail -1 || echo none)"

  # ---------------------------------------------------------------- unpack
  phase "unpack"
  if [ ! -f "$CARRY/node.xz" ]; then
    if [ "$DRY" = 1 ]; then
      log "no .carry/ (run bench/pack-gpu.sh first to check the archives): skipped, using the local tree"
    else
      fail ".carry/ missing: run bench/pack-gpu.sh where Node.js is, and carry .carry"; return 1
    fi
  elif [ "$DRY" = 1 ]; then
    local U="$WORK/unpack"
    rm -rf "$U" && mkdir -p "$U/deps"
    unpack_node "$U"
    [ "$("$U/bin/node" --version)" = "$(node --version)" ] && log "node binary: $("$U/bin/node" --version), runs" || fail "carried node binary does not run"
    tar -C "$U" -xJf "$CARRY/node_modules.tar.xz" && tar -C "$U" -xJf "$CARRY/dist.tar.xz" && tar -C "$U/deps" -xJf "$CARRY/llama.cpp.tar.xz" || fail "unpacking"
    (cd "$U" && "$U/bin/node" -e "require('sharp'); require('fastify'); require('prom-client'); require('@fastify/multipart'); console.log('node_modules: sharp, fastify, prom-client, @fastify/multipart load')") || fail "carried node_modules"
    [ -f "$U/dist/bench/run.js" ] && [ -f "$U/dist/src/cli.js" ] && log "dist: bench and cli present" || fail "carried dist incomplete"
    [ -f "$U/deps/llama.cpp/CMakeLists.txt" ] && [ -f "$U/deps/llama.cpp/.caprl-pin" ] || fail "carried llama.cpp incomplete"
    log "unpacked into $U ($(du -sh "$U" | cut -f1)); checking that the trimmed llama.cpp configures (tools on, CPU)"
    local P="$U/proj"
    mkdir -p "$P/deps"
    for f in CMakeLists.txt package.json native kernels test; do ln -s "$ROOT/$f" "$P/$f"; done  # what CMakeLists.txt reads
    ln -s "$U/node_modules" "$P/node_modules"
    ln -s "$U/deps/llama.cpp" "$P/deps/llama.cpp"
    if (cd "$P" && PATH="$U/bin:$PATH" node node_modules/cmake-js/bin/cmake-js configure --directory "$P" --out "$P/build" \
          --log-level warn --CDCAPRL_CUDA=OFF --CDCAPRL_LLAMA_COMMIT="$COMMIT") > "$WORK/configure-check.log" 2>&1; then
      log "cmake-js configure of the carried tree: ok (offline Node-API headers, trimmed llama.cpp)"
      if cmake --build "$P/build" --target llama-ui-assets >> "$WORK/configure-check.log" 2>&1; then
        log "llama-server's UI asset step runs on the trimmed tree (placeholder UI)"
      else
        fail "llama-ui-assets on the carried tree"
      fi
    else
      tail -20 "$WORK/configure-check.log"; fail "cmake-js configure of the carried tree"
    fi
    export PATH="$U/bin:$PATH"
  else
    if ! command -v node >/dev/null 2>&1; then unpack_node "$WORK"; export PATH="$WORK/bin:$PATH"; fi
    log "node $(node --version) at $(command -v node)"
    if [ ! -d "$ROOT/node_modules/fastify" ]; then tar -C "$ROOT" -xJf "$CARRY/node_modules.tar.xz" || { fail "node_modules"; return 1; }; fi
    rm -rf "$ROOT/dist" && tar -C "$ROOT" -xJf "$CARRY/dist.tar.xz" || { fail "dist"; return 1; }
    if [ ! -f "$ROOT/deps/llama.cpp/.caprl-pin" ]; then
      mkdir -p "$ROOT/deps" && tar -C "$ROOT/deps" -xJf "$CARRY/llama.cpp.tar.xz" || { fail "llama.cpp source"; return 1; }
    fi
    log "unpacked: node_modules, dist, deps/llama.cpp"
  fi

  # ---------------------------------------------------------------- build
  phase "build"
  local BUILD_LOG="$OUT/build.log"
  if [ "$DRY" = 1 ]; then
    log "dry run: no CUDA build here; the GPU run does:"
    log "  node node_modules/cmake-js/bin/cmake-js configure --directory . --CDCAPRL_CUDA=ON --CDCMAKE_CUDA_ARCHITECTURES=$ARCHS --CDCAPRL_LLAMA_COMMIT=$COMMIT"
    log "  cmake --build build --config Release -j $JOBS --target caprl_engine llama-server llama-mtmd-cli"
    echo "dry run: nothing built" > "$BUILD_LOG"
  elif [ "$SKIP_BUILD" = 1 ]; then
    log "--skip-build: reusing build/"
  else
    local t0=$SECONDS
    { node node_modules/cmake-js/bin/cmake-js configure --directory "$ROOT" --log-level warn \
        --CDCAPRL_CUDA=ON --CDCMAKE_CUDA_ARCHITECTURES="$ARCHS" --CDCAPRL_LLAMA_COMMIT="$COMMIT" \
      && timeout "$(left1)" cmake --build build --config Release -j "$JOBS" --target caprl_engine llama-server llama-mtmd-cli; } > "$BUILD_LOG" 2>&1
    local rc=$?
    if [ $rc -ne 0 ] && [ ! -x build/bin/llama-server ] && [ "$(left)" -gt 60 ]; then
      log "build failed (rc $rc); trying llama-server alone"
      timeout "$(left1)" cmake --build build --config Release -j "$JOBS" --target llama-server >> "$BUILD_LOG" 2>&1
    fi
    [ $rc -eq 0 ] || { tail -30 "$BUILD_LOG"; fail "build (rc $rc, see build.log)"; }
    log "build took $((SECONDS - t0)) s"
  fi
  ls -l build/Release/caprl_engine.node build/bin/llama-server build/bin/llama-mtmd-cli 2>&1 | sed 's/^/  /'
  [ "$BUILD_ONLY" = 1 ] && { log "--build-only: done"; return $STATUS; }

  # ---------------------------------------------------------------- models
  phase "models ($PRESET: $DTYPES)"
  mkdir -p "$WORK/models"
  for dt in ${DTYPES//,/ }; do
    if [ -f "$WORK/models/$PRESET-$dt.gguf" ] && [ -f "$WORK/models/mmproj-$PRESET-$dt.gguf" ]; then
      log "$PRESET-$dt: already there"
    else
      node bin/caprl.js generate-model --preset "$PRESET" --dtype "$dt" --out "$WORK/models" || fail "generate-model $PRESET $dt"
    fi
  done

  # ---------------------------------------------------------------- kernels
  phase "gpu-check (kernels/image-prep.cu vs the CPU reference)"
  if [ "${SKIP_GPU_CHECK:-0}" = 1 ]; then
    log "SKIP_GPU_CHECK=1: gpu-check skipped" | tee "$OUT/gpu-check.txt"
  elif [ -z "$NVCC" ]; then
    log "no nvcc: gpu-check skipped" | tee "$OUT/gpu-check.txt"
  elif "$NVCC" -O3 -std=c++17 -arch="sm_${ARCHS%%[;,]*}" -Ikernels kernels/test/gpu-check.cu kernels/image-prep.cu \
        kernels/image-prep-ref.cpp -o "$WORK/gpu-check" > "$WORK/gpu-check-build.log" 2>&1; then
    rm -rf "$WORK/dump" && mkdir -p "$WORK/dump"
    timeout 120 "$WORK/gpu-check" --iters 20 --dump "$WORK/dump" > "$OUT/gpu-check.txt" 2>&1
    local rc=$?
    cat "$OUT/gpu-check.txt"
    if [ $rc -eq 2 ] && [ "$DRY" = 1 ]; then log "no CUDA device here: expected in a dry run"
    elif [ $rc -ne 0 ]; then fail "gpu-check (rc $rc)"; fi
    GPU_CHECK_RC=$rc
  else
    cat "$WORK/gpu-check-build.log"; fail "nvcc gpu-check"
  fi

  # ---------------------------------------------------------------- bench
  phase "bench: caprl (and caprl-vision) vs llama-server, c=$CONC, requests $REQS, $SIZES, $TOKENS tokens"
  local servers=() ls_bin=${LLAMA_SERVER:-$ROOT/build/bin/llama-server}
  # caprl-vision: caprl with --vision-encoder caprl (BENCH_CAPRL_VISION=0 leaves it out).
  if [ -f build/Release/caprl_engine.node ] && [ -f dist/src/entrypoints/openai/serve.js ]; then
    servers+=(caprl); [ "${BENCH_CAPRL_VISION:-1}" = 1 ] && servers+=(caprl-vision)
  else log "caprl not benchmarked: build/Release/caprl_engine.node or dist/src/entrypoints/openai/serve.js missing"; fi
  if [ -x "$ls_bin" ]; then servers+=(llama-server)
  else log "llama-server not benchmarked: $ls_bin missing (bench/build-llama-server.sh; or LLAMA_SERVER=...)"; fi
  if [ ${#servers[@]} -eq 0 ]; then fail "nothing to benchmark"; return 1; fi
  local list; list=$(IFS=,; echo "${servers[*]}")
  # The serving benchmark runs first; the checks after it (KV sizing, sampler, vision encoder) get
  # AFTER_BENCH seconds, and each is skipped when its time is not left.
  local AFTER_BENCH=${AFTER_BENCH:-120}
  local dt0=${DTYPES%%,*}
  for dt in ${DTYPES//,/ }; do
    local rem=$(( $(left) - 20 - AFTER_BENCH ))
    if [ $rem -lt 60 ]; then log "bench $dt skipped: ${rem}s left"; continue; fi
    log "bench $PRESET-$dt with $list, deadline ${rem}s"
    timeout $((rem + 15)) node dist/bench/run.js --model "$WORK/models/$PRESET-$dt.gguf" --mmproj "$WORK/models/mmproj-$PRESET-$dt.gguf" \
      --servers "$list" --llama-server "$ls_bin" --concurrency "$CONC" --requests "$REQS" --image-sizes "$SIZES" \
      --output-tokens "$TOKENS" --out "$OUT" --tag "bench-$PRESET-$dt" --log-dir "$WORK/logs-$dt" --deadline "$rem" \
      2>&1 | tee "$WORK/bench-$dt.out"
    [ "${PIPESTATUS[0]}" = 0 ] || fail "bench $dt"
  done

  # ---------------------------------------------------------------- KV cache sizing
  # vLLM's default --gpu-memory-utilization 0.9 on this device: what the engine measured and chose,
  # with llama.cpp's clip and with our encoder (its compute buffers reserved before the cache),
  # and how many sequences serve's default (maxSeqs 0: as many as the cache holds) gives.
  phase "KV cache sizing (memoryFraction 0.9, $PRESET-${DTYPES%%,*})"
  local seqs=0
  [ "$DRY" = 1 ] && seqs=4
  if [ "$(left)" -gt 50 ]; then
    timeout $(( $(left1) > 90 ? 90 : $(left1) )) node --input-type=module -e "
      import { Engine } from './dist/src/engine/engine.js';
      import { describeKvCache } from './dist/src/config/kv-cache-sizing.js';
      for (const visionEncoder of ['llama.cpp', 'caprl']) {
        const e = new Engine({ model: '$WORK/models/$PRESET-$dt0.gguf', mmproj: '$WORK/models/mmproj-$PRESET-$dt0.gguf',
          memoryFraction: 0.9, maxModelLen: 8192, maxSeqs: $seqs, nBatch: 2048, logLevel: 'error', visionEncoder });
        console.log(visionEncoder + ': ' + e.info.maxSeqs + ' sequences; ' + describeKvCache(e.info.kvCache, e.info.visionEncoder));
        console.log(JSON.stringify({ kvCache: e.info.kvCache, visionEncoder: e.info.visionEncoder }));
        await e.close();
      }" 2>&1 | sed 's/^/  /'
    [ "${PIPESTATUS[0]}" = 0 ] || fail "KV cache sizing"
  else
    log "KV cache sizing skipped: $(left)s left"
  fi

  # ---------------------------------------------------------------- vision encoder
  # Ours (native/qwen-vision-encoder.cpp: batched, window attention over the real windows) vs
  # llama.cpp's clip, same images: ms per image at batch 1 and 8, and ours' relative error.
  # 1036x1036 is what the server hands the encoder for a 1024x1024 JPEG (already on the 28-px
  # grid); 1024x1024 adds the encoder's own resize to it.
  local vsizes=1036x1036,1024x1024 vbatches=1,8
  [ "$DRY" = 1 ] && { vsizes=224x224; vbatches=1,2; }
  phase "vision encoder: caprl vs llama.cpp clip ($PRESET-$dt0, $vsizes, batch $vbatches)"
  if [ "$(left)" -gt 60 ]; then
    timeout $(( $(left1) - 10 > 150 ? 150 : $(left1) - 10 )) node dist/bench/vision-encoder.js --model "$WORK/models/$PRESET-$dt0.gguf" --mmproj "$WORK/models/mmproj-$PRESET-$dt0.gguf" \
      --sizes "$vsizes" --batches "$vbatches" --repeat 3 --max-error 0.02 2> "$WORK/vision-encoder.err" | tee "$WORK/vision-encoder.out"
    [ "${PIPESTATUS[0]}" = 0 ] || { tail -20 "$WORK/vision-encoder.err"; fail "vision encoder comparison"; }
  else
    log "vision encoder comparison skipped: $(left)s left"
  fi

  # ---------------------------------------------------------------- sampler
  phase "sampler: our direct sampler vs llama.cpp's chain on this host's CPU (151,936 logits)"
  if [ ! -x build/bin/caprl-sampler-check ]; then log "build/bin/caprl-sampler-check missing"
  elif [ "$(left)" -gt 30 ]; then timeout 25 build/bin/caprl-sampler-check bench 2>&1 | sed 's/^/  /'
  else log "sampler benchmark skipped: $(left)s left"; fi

  # ---------------------------------------------------------------- image prep (JS)
  phase "image prep: the server's JPEG decode + resize to the grid, on this host's CPU"
  if [ "$(left)" -gt 30 ]; then timeout 25 node dist/bench/image-prep.js --sizes 640x480,1024x1024,4000x3000 --rounds 5 2>&1 | sed 's/^/  /'
  else log "image prep benchmark skipped: $(left)s left"; fi

  # After the bench, with what time is left: our reference's HF-order patches vs transformers.
  if [ "${GPU_CHECK_RC:-1}" = 0 ] && [ "$(left)" -gt 40 ]; then
    phase "hf-check (reference patches vs transformers' Qwen2VLImageProcessor)"
    timeout $(( $(left1) - 10 > 5 ? $(left1) - 10 : 5 )) python3 kernels/test/hf-check.py "$WORK/dump" 2>&1 | tee -a "$OUT/gpu-check.txt"
    [ "${PIPESTATUS[0]}" = 1 ] && fail "hf-check: our patches differ from transformers'"
  fi
  for f in "$WORK"/logs-*/*.log; do
    [ -f "$f" ] && { echo "===== $f (last 150 lines)"; tail -n 150 "$f"; }
  done > "$OUT/server-logs.txt" 2>/dev/null
  return $STATUS
}

main 2>&1 | tee "$OUT/gpu.log"
rc=${PIPESTATUS[0]}
# Keep build.log small enough to come back.
if [ -f "$OUT/build.log" ] && [ "$(stat -c %s "$OUT/build.log")" -gt 400000 ]; then
  tail -c 400000 "$OUT/build.log" > "$OUT/build.log.tmp" && mv "$OUT/build.log.tmp" "$OUT/build.log"
fi
{
  echo
  echo "================ summary ($(date -u +%H:%M:%S), ${SECONDS}s, rc $rc)"
  grep -hE '^gpu-check: ([0-9]+ cases|no CUDA)|^hf-check: ([0-9]+ compared|skipped)|^FAIL|1024x1024' "$OUT/gpu-check.txt" 2>/dev/null
  [ -f "$WORK/vision-encoder.out" ] && { echo "-- vision encoder (ms per image)"; grep -hE '^\||^ours' "$WORK/vision-encoder.out"; }
  for f in "$WORK"/bench-*.out; do
    [ -f "$f" ] || continue
    echo "-- $(basename "$f" .out)"
    sed -n '/^c  *server/,$p' "$f"
  done
  for f in "$OUT"/bench-*.md; do
    [ -f "$f" ] && grep -h '^- issue 8 targets' "$f"
  done
  ls "$OUT"
} | tee -a "$OUT/gpu.log"
exit $rc
