// How `caprl serve` sizes the KV cache, as vLLM does: --kv-cache-memory-bytes if given, else
// --gpu-memory-utilization (default 0.9) of the GPU that holds the cache. --kv-cache-tokens (ours,
// llama-server's -c) wins over both. Where no GPU holds the cache, vLLM ignores
// --gpu-memory-utilization, and so do we: the cache then holds a token count.
import type { EngineOptions, GpuDevice, KvCacheInfo, VisionEncoderInfo } from '../engine/native-types.js';
import { CliUsageError } from './cli-args.js';

export const VLLM_DEFAULT_GPU_MEMORY_UTILIZATION = 0.9;
/** The cache in tokens where no flag and no GPU size it (at least one --max-model-len request). */
export const DEFAULT_KV_CACHE_TOKENS = 32768;

/** The KV cache flags as given (undefined = not given). */
export interface KvCacheFlags {
  tokens?: number;
  bytes?: number;
  gpuMemoryUtilization?: number;
}

export type KvCacheSizing = Required<Pick<EngineOptions, 'nCtx'>> | Required<Pick<EngineOptions, 'kvCacheBytes'>> |
  Required<Pick<EngineOptions, 'memoryFraction'>>;

/** Checks the flags that need no device to check. */
export function checkKvCacheFlags(flags: KvCacheFlags, maxModelLen: number): KvCacheFlags {
  if (flags.tokens !== undefined && flags.bytes !== undefined) {
    throw new CliUsageError('give --kv-cache-tokens or --kv-cache-memory-bytes, not both');
  }
  if (flags.tokens !== undefined && flags.tokens < maxModelLen) {
    throw new CliUsageError(`--kv-cache-tokens (${flags.tokens}) must be at least --max-model-len (${maxModelLen})`);
  }
  if (flags.bytes !== undefined && !(flags.bytes >= 1)) {
    throw new CliUsageError(`argument --kv-cache-memory-bytes: must be at least 1, got ${flags.bytes}`);
  }
  if (flags.gpuMemoryUtilization !== undefined) checkGpuMemoryUtilization(flags.gpuMemoryUtilization);
  return flags;
}

export function checkGpuMemoryUtilization(gmu: number): void {
  if (!(gmu > 0 && gmu <= 1)) throw new CliUsageError(`argument --gpu-memory-utilization: must be in (0, 1], got ${gmu}`);
}

/** The engine's KV sizing for these flags, given whether a GPU will hold the cache. */
export function kvCacheSizing(flags: KvCacheFlags, maxModelLen: number, kvOnGpu: boolean): KvCacheSizing {
  if (flags.tokens !== undefined) return { nCtx: flags.tokens };
  if (flags.bytes !== undefined) return { kvCacheBytes: flags.bytes };
  if (kvOnGpu) return { memoryFraction: flags.gpuMemoryUtilization ?? VLLM_DEFAULT_GPU_MEMORY_UTILIZATION };
  return { nCtx: Math.max(DEFAULT_KV_CACHE_TOKENS, maxModelLen) };
}

/** llama.cpp keeps the KV cache beside the layers: on the GPU unless no layer is offloaded. */
export function kvCacheOnGpu(gpus: readonly GpuDevice[], nGpuLayers: number): boolean {
  return gpus.length > 0 && nGpuLayers !== 0;
}

const GIB = 1024 ** 3;

/**
 * The start-up log line: how big the KV cache is, where, and what sized it; with our vision
 * encoder, its share of the non-KV bytes on the cache's device.
 */
export function describeKvCache(kv: KvCacheInfo, vision?: VisionEncoderInfo | null): string {
  const gib = (b: number): string => `${(b / GIB).toFixed(2)} GiB`;
  const here = (vision?.devices ?? []).filter((d) => d.device === kv.device);
  const ours = here.length === 0 ? '' :
    ` (caprl vision encoder ${gib(here.reduce((s, d) => s + d.weightsBytes + d.computeBytes, 0))}, ` +
    `buffers for ${vision?.maxPatches} patches)`;
  const by = kv.sizedBy === 'tokens' ? 'a token count' :
    kv.sizedBy === 'bytes' ? '--kv-cache-memory-bytes' :
    `--gpu-memory-utilization ${kv.memoryFraction} of ${gib(kv.deviceTotalBytes)} (free at start ${gib(kv.deviceFreeBytes)}; ` +
    `weights and vision ${gib(kv.nonKvBytes)}${ours}, compute buffers ${gib(kv.computeBytes)})`;
  const layout = kv.layout === 'per-sequence' ? 'a stream per sequence' : 'one pool shared by all sequences';
  return `KV cache: ${kv.tokens} tokens, ${gib(kv.bytes)} on ${kv.device} (${(kv.bytesPerToken / 1024).toFixed(1)} KiB/token, ${layout}), sized by ${by}`;
}
