// KV cache sizing: in tokens, in bytes (--kv-cache-memory-bytes) and as a share of the device's
// memory (--gpu-memory-utilization), on the real engine. Here the device is the CPU; on a GPU the
// same code reads the GPU's memory (bench/gpu.sh runs it there).
import t from 'tap';
import { Engine } from '../src/engine/engine.js';
import type { EngineOptions } from '../src/engine/native-types.js';
import { describeKvCache, kvCacheOnGpu, kvCacheSizing } from '../src/config/kv-cache-sizing.js';
import { greedy } from './helpers/engine-inputs.js';
import { tinyModel } from './helpers/models.js';

// The tiny model's KV cache: 2 layers x (K + V) x 2 KV heads x 32 dims x 2 bytes (f16).
const TINY_KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 32 * 2;
const MAX_MODEL_LEN = 2048;
const MAX_SEQS = 4;

async function open(sizing: Partial<EngineOptions>): Promise<Engine> {
  const { model, mmproj } = await tinyModel();
  return new Engine({ model, mmproj, maxModelLen: MAX_MODEL_LEN, maxSeqs: MAX_SEQS, nBatch: 512, nThreads: 1, logLevel: 'error', ...sizing });
}

/** A short greedy request, to show the engine serves with the cache it sized. */
async function serves(engine: Engine): Promise<number> {
  let n = 0;
  const gen = engine.generate({
    prompt: '<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n', images: [], n: 1,
    sampling: greedy(8),
  });
  for await (const ev of gen) n += ev.tokens.length;
  return n;
}

t.test('the flags pick the sizing as vLLM does', async (t) => {
  t.same(kvCacheSizing({}, 8192, true), { memoryFraction: 0.9 }, 'a GPU holds the cache: 0.9 of its memory by default');
  t.same(kvCacheSizing({ gpuMemoryUtilization: 0.5 }, 8192, true), { memoryFraction: 0.5 });
  t.same(kvCacheSizing({ gpuMemoryUtilization: 0.5, bytes: 1 << 30 }, 8192, true), { kvCacheBytes: 1 << 30 }, 'bytes override the share');
  t.same(kvCacheSizing({ gpuMemoryUtilization: 0.5, tokens: 10000 }, 8192, true), { nCtx: 10000 }, 'a token count wins');
  t.same(kvCacheSizing({ gpuMemoryUtilization: 0.5 }, 8192, false), { nCtx: 32768 }, 'no GPU: the share means nothing');
  t.same(kvCacheSizing({}, 65536, false), { nCtx: 65536 }, 'no GPU: at least one --max-model-len request');
  t.same(kvCacheSizing({ bytes: 4096 }, 8192, false), { kvCacheBytes: 4096 }, 'bytes apply in host memory too');
  const gpu = { name: 'CUDA0', description: 'NVIDIA H100', totalBytes: 80e9, freeBytes: 79e9 };
  t.equal(kvCacheOnGpu([gpu], -1), true);
  t.equal(kvCacheOnGpu([gpu], 0), false, '--n-gpu-layers 0 keeps the KV cache in host memory');
  t.equal(kvCacheOnGpu([], -1), false);
});

t.test('a token count', async (t) => {
  const engine = await open({ nCtx: 4096 });
  t.teardown(() => engine.close());
  const kv = engine.info.kvCache;
  t.equal(kv.sizedBy, 'tokens');
  t.equal(kv.tokens, 4096);
  t.equal(engine.info.nCtx, 4096);
  t.equal(kv.bytesPerToken, TINY_KV_BYTES_PER_TOKEN, 'bytes per token as the model shape says');
  t.equal(kv.bytes, 4096 * TINY_KV_BYTES_PER_TOKEN, 'what llama.cpp allocated');
  t.equal(kv.device, 'CPU');
});

t.test('a byte budget (--kv-cache-memory-bytes)', async (t) => {
  const budget = 3 * 1024 * 1024 + 1000; // not a multiple of a token's bytes nor of the 256-cell padding
  const engine = await open({ kvCacheBytes: budget });
  t.teardown(() => engine.close());
  const kv = engine.info.kvCache;
  t.equal(kv.sizedBy, 'bytes');
  t.equal(kv.tokens, Math.floor(budget / TINY_KV_BYTES_PER_TOKEN / 256) * 256, 'as many tokens as fit, in whole 256-cell pages');
  t.ok(kv.bytes <= budget, `allocated ${kv.bytes} bytes within the ${budget} asked for`);
  t.equal(engine.info.nCtx, kv.tokens);
  t.equal(await serves(engine), 8);
  t.equal(describeKvCache(kv), 'KV cache: 6144 tokens, 0.00 GiB on CPU (0.5 KiB/token, one pool shared by all sequences), sized by --kv-cache-memory-bytes', 'the start-up line');

  await t.rejects(open({ kvCacheBytes: 100 * TINY_KV_BYTES_PER_TOKEN }), /holds 0 tokens, fewer than one request of --max-model-len 2048/);
});

t.test('a share of the device memory (--gpu-memory-utilization)', async (t) => {
  // A generous share: the cache stops at every sequence at its longest.
  const roomy = await open({ memoryFraction: 0.05 });
  const big = roomy.info.kvCache;
  await roomy.close();
  t.equal(big.sizedBy, 'memory-fraction');
  t.equal(big.tokens, MAX_SEQS * MAX_MODEL_LEN, 'capped at max-num-seqs x max-model-len');
  t.equal(big.layout, 'per-sequence', 'room for every sequence at its longest: a KV stream each');
  t.ok(big.nonKvBytes > 0, 'weights and vision counted');

  // A tight share, half the cache's bytes short of that: the share binds.
  const footprint = big.nonKvBytes + big.computeBytes + big.bytes;
  const share = (footprint - big.bytes / 2) / big.deviceTotalBytes;
  const engine = await open({ memoryFraction: share });
  t.teardown(() => engine.close());
  const kv = engine.info.kvCache;
  t.ok(kv.tokens < big.tokens, `${kv.tokens} tokens: fewer than the cap`);
  t.equal(kv.layout, 'unified', 'less: one pool shared by all sequences');
  t.ok(kv.tokens >= MAX_MODEL_LEN, 'room for one longest request');
  t.equal(kv.tokens % 256, 0);
  const used = kv.nonKvBytes + kv.computeBytes + kv.bytes;
  t.ok(used <= share * kv.deviceTotalBytes, `the engine's ${used} bytes fit its share of ${Math.floor(share * kv.deviceTotalBytes)}`);
  t.ok(used > share * kv.deviceTotalBytes - 2 * 256 * (TINY_KV_BYTES_PER_TOKEN + 2048), 'and use it, up to a page or two of cells');
  t.equal(await serves(engine), 8);

  await t.rejects(open({ memoryFraction: 1e-6 }), /one request of --max-model-len 2048 needs .* raise --gpu-memory-utilization or lower --max-model-len/);
});

t.test('our vision encoder reserves its buffers before the KV cache takes the share', async (t) => {
  // With llama.cpp's clip, the cache reaches its cap at this share...
  const clipEngine = await open({ memoryFraction: 0.05 });
  const clip = clipEngine.info.kvCache;
  t.equal(clipEngine.info.visionEncoder, null, "clip: no report of ours");
  await clipEngine.close();

  const roomy = await open({ memoryFraction: 0.05, visionEncoder: 'caprl' });
  const vision = roomy.info.visionEncoder;
  const kv = roomy.info.kvCache;
  await roomy.close();
  t.equal(vision?.kind, 'caprl');
  t.equal(vision?.devices.length, 1);
  const cpu = vision?.devices[0];
  t.equal(cpu?.device, 'CPU');
  t.ok((cpu?.computeBytes ?? 0) > 0, `${cpu?.computeBytes} compute bytes reserved before any image`);
  const ours = (cpu?.weightsBytes ?? 0) + (cpu?.computeBytes ?? 0);
  // The same engine but for our encoder's weights and buffers, in host memory like the cache.
  t.equal(kv.nonKvBytes - clip.nonKvBytes, ours, 'non-KV bytes include our encoder, compute buffers and all');
  t.match(describeKvCache(kv, vision), /weights and vision [\d.]+ GiB \(caprl vision encoder [\d.]+ GiB, buffers for 16384 patches\)/,
    'the start-up line says what our encoder holds');

  // A share that holds clip's engine at its cap with our encoder's bytes to spare holds ours at
  // half its cache (as the tight share above): fewer cells.
  const share = (kv.nonKvBytes + clip.computeBytes + clip.bytes / 2) / clip.deviceTotalBytes;
  const clipShare = await open({ memoryFraction: share });
  t.equal(clipShare.info.kvCache.tokens, MAX_SEQS * MAX_MODEL_LEN, 'clip: the cap');
  await clipShare.close();
  const oursShare = await open({ memoryFraction: share, visionEncoder: 'caprl' });
  const tokens = oursShare.info.kvCache.tokens;
  await oursShare.close();
  t.ok(tokens < MAX_SEQS * MAX_MODEL_LEN && tokens >= MAX_MODEL_LEN, `ours: ${tokens} tokens`);
});

t.test('maxSeqs 0 (--max-num-seqs not given): as many sequences as the cache holds at --max-model-len, 16 to 256', async (t) => {
  // 40 streams of 2048 cells, with 1000 cells to spare: 40 sequences, each a stream of its own.
  const fits = await open({ nCtx: 40 * MAX_MODEL_LEN + 1000, maxSeqs: 0 });
  t.equal(fits.info.maxSeqs, 40);
  t.equal(fits.info.kvCache.layout, 'per-sequence');
  t.equal(fits.info.kvCache.tokens, 40 * MAX_MODEL_LEN, 'the spare cells, less than a stream, are not allocated');
  // All 40 at once: they decode together (with the old default of 16, at most 16 would).
  const tokens = await Promise.all(Array.from({ length: 40 }, () => serves(fits)));
  t.same(tokens, Array(40).fill(8), 'every request generated');
  t.equal(fits.stats().maxBatchSeqs, 40, 'all 40 sequences decoded in one step');
  await fits.close();

  // --max-model-len not a multiple of llama.cpp's 256-cell stream padding: streams of 1024 cells,
  // and the pool split in whole streams so that the padding takes no more than was planned.
  const odd = await open({ nCtx: 20 * 1024 + 500, maxModelLen: 1000, maxSeqs: 0 });
  t.equal(odd.info.maxSeqs, 20);
  t.equal(odd.info.kvCache.layout, 'per-sequence');
  t.equal(odd.info.kvCache.tokens, 20 * 1024);
  await odd.close();

  // Too small a cache for 16 streams: 16 sequences share one pool (the old fixed default).
  const small = await open({ nCtx: 4 * MAX_MODEL_LEN, maxSeqs: 0 });
  t.equal(small.info.maxSeqs, 16);
  t.equal(small.info.kvCache.layout, 'unified');
  t.equal(await serves(small), 8);
  await small.close();

  // Sized by memory: the cache is planned for 256 streams, llama.cpp's limit, and stops there.
  const roomy = await open({ memoryFraction: 0.05, maxModelLen: 256, maxSeqs: 0 });
  t.equal(roomy.info.maxSeqs, 256);
  t.equal(roomy.info.kvCache.tokens, 256 * 256);
  t.equal(roomy.info.kvCache.layout, 'per-sequence');
  t.equal(await serves(roomy), 8);
  await roomy.close();

  t.throws(() => new Engine({ model: 'x.gguf', nCtx: 4096, maxSeqs: 257, nBatch: 512 }), /at most 256 sequences \(llama.cpp's limit\), not 257/,
    'more than llama.cpp decodes together: a clear error before loading anything');
  t.throws(() => new Engine({ model: 'x.gguf', nCtx: 4096, maxSeqs: -1, nBatch: 512 }), /maxSeqs must be 0/);
});
