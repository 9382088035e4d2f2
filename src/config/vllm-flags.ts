// The `vllm serve` flags that caprl serve takes so that a vLLM command line works unchanged:
// the ones with an effect here (--api-key, --gpu-memory-utilization, --limit-mm-per-prompt,
// --mm-processor-kwargs, --allowed-local-media-path, --max-logprobs, --disable-log-requests), the
// ones accepted and checked but without effect (--trust-remote-code, --enable-prefix-caching,
// --enable-log-requests), and the parallelism flags, where only 1 makes sense for one process on
// one device. docs/vllm-parity.md lists every flag with its status.
import { realpathSync, statSync } from 'node:fs';
import path from 'node:path';
import { LLAMA_CPP_QWEN25VL_LIMITS } from '../images/qwen-resize.js';
import { CliUsageError, type FlagSpec, type ParsedValue } from './cli-args.js';
import { VLLM_DEFAULT_GPU_MEMORY_UTILIZATION, checkGpuMemoryUtilization } from './kv-cache-sizing.js';

/** vLLM V1's default per-modality limit (MultiModalConfig.limit_per_prompt: "999 (V1)"). */
export const VLLM_DEFAULT_MM_LIMIT = 999;
/** vLLM's --max-logprobs default. */
export const VLLM_DEFAULT_MAX_LOGPROBS = 20;

export const VLLM_COMPAT_FLAGS: FlagSpec[] = [
  { name: 'api-key', type: 'strings', dest: 'apiKey', metavar: 'KEY', help: 'require `Authorization: Bearer KEY` on /v1/* (one or more keys; default: $VLLM_API_KEY, else no key)' },
  { name: 'tensor-parallel-size', aliases: ['tp'], type: 'int', dest: 'tensorParallelSize', help: 'must be 1: one process drives one device (vLLM compatibility)' },
  { name: 'pipeline-parallel-size', aliases: ['pp'], type: 'int', dest: 'pipelineParallelSize', help: 'must be 1 (vLLM compatibility)' },
  { name: 'gpu-memory-utilization', type: 'float', dest: 'gpuMemoryUtilization', help: `share of the GPU's memory for this server (weights, vision encoder, buffers and KV cache), which sizes the KV cache (default: ${VLLM_DEFAULT_GPU_MEMORY_UTILIZATION}; no effect where no GPU holds the cache)` },
  { name: 'trust-remote-code', type: 'bool', dest: 'trustRemoteCode', help: 'accepted for vLLM compatibility, no effect: no model code is ever run from the model folder' },
  { name: 'enable-prefix-caching', type: 'bool', dest: 'enablePrefixCaching', help: 'accepted for vLLM compatibility, no effect: prompts are not cached across requests (n choices share one prefill)' },
  { name: 'limit-mm-per-prompt', type: 'string', dest: 'limitMmPerPrompt', metavar: 'JSON', help: `most images per request: '{"image": 4}' or image=4 (default: ${VLLM_DEFAULT_MM_LIMIT}, as vLLM V1)` },
  { name: 'mm-processor-kwargs', type: 'string', dest: 'mmProcessorKwargs', metavar: 'JSON', help: `image resize bounds, '{"min_pixels": N, "max_pixels": N}' (default and allowed range: ${LLAMA_CPP_QWEN25VL_LIMITS.minPixels}..${LLAMA_CPP_QWEN25VL_LIMITS.maxPixels})` },
  { name: 'allowed-local-media-path', type: 'string', dest: 'allowedLocalMediaPath', metavar: 'DIR', help: 'let requests read images from file:// URLs inside DIR (default: none)' },
  { name: 'max-logprobs', type: 'int', dest: 'maxLogprobs', help: `most top_logprobs / logprobs a request may ask for (default: ${VLLM_DEFAULT_MAX_LOGPROBS})` },
  { name: 'disable-log-requests', type: 'bool', dest: 'disableLogRequests', help: 'no log line per request' },
  { name: 'enable-log-requests', type: 'bool', dest: 'enableLogRequests', help: 'one log line per request (the default here)' },
];

export interface VllmCompatConfig {
  /** Bearer keys accepted on /v1/*; empty = no auth. */
  apiKeys: string[];
  /** Most images in one request. */
  limitImagesPerPrompt: number;
  /** Image resize bounds in pixels. */
  minPixels: number;
  maxPixels: number;
  /** Real path of the folder file:// images may come from. */
  allowedLocalMediaPath?: string;
  maxLogprobs: number;
  logRequests: boolean;
  /** One line per flag accepted without (full) effect, for the start-up log. */
  notes: string[];
}

function given(values: Record<string, ParsedValue>, key: string): boolean {
  return values[key] !== undefined;
}

/** `{"image": 4}` (vLLM ≥ 0.6 JSON form) or `image=4,video=0` (the older key=value form). */
export function parseLimitMmPerPrompt(raw: string): Record<string, number> {
  const flag = '--limit-mm-per-prompt';
  const text = raw.trim();
  const out: Record<string, number> = {};
  const put = (k: string, v: unknown): void => {
    const key = k.trim();
    const n = typeof v === 'string' && /^\s*\d+\s*$/.test(v) ? Number(v) : v;
    if (typeof n !== 'number' || !Number.isInteger(n) || n < 0) {
      throw new CliUsageError(`argument ${flag}: the limit for "${key}" must be a non-negative integer, got ${JSON.stringify(v)}`);
    }
    if (key !== 'image' && key !== 'video' && key !== 'audio') {
      throw new CliUsageError(`argument ${flag}: unknown modality "${key}" (this model takes "image")`);
    }
    out[key] = n;
  };
  if (text.startsWith('{')) {
    let obj: unknown;
    try {
      obj = JSON.parse(text);
    } catch (err) {
      throw new CliUsageError(`argument ${flag}: invalid JSON: ${(err as Error).message}`);
    }
    if (typeof obj !== 'object' || obj === null || Array.isArray(obj)) {
      throw new CliUsageError(`argument ${flag}: expected a JSON object like '{"image": 4}'`);
    }
    for (const [k, v] of Object.entries(obj)) {
      // vLLM 0.11+ also takes {"image": {"count": 4, ...}}: only the count matters here.
      put(k, typeof v === 'object' && v !== null && 'count' in v ? (v as { count: unknown }).count : v);
    }
    return out;
  }
  for (const item of text.split(',')) {
    if (item.trim() === '') continue;
    const eq = item.indexOf('=');
    if (eq < 0) throw new CliUsageError(`argument ${flag}: expected '{"image": N}' or image=N, got '${raw}'`);
    put(item.slice(0, eq), item.slice(eq + 1));
  }
  return out;
}

/** --mm-processor-kwargs JSON -> resize bounds (min_pixels / max_pixels) and notes for other keys. */
export function parseMmProcessorKwargs(raw: string): { minPixels?: number; maxPixels?: number; ignored: string[] } {
  const flag = '--mm-processor-kwargs';
  let obj: unknown;
  try {
    obj = JSON.parse(raw);
  } catch (err) {
    throw new CliUsageError(`argument ${flag}: invalid JSON: ${(err as Error).message}`);
  }
  if (typeof obj !== 'object' || obj === null || Array.isArray(obj)) {
    throw new CliUsageError(`argument ${flag}: expected a JSON object like '{"max_pixels": 1003520}'`);
  }
  const out: { minPixels?: number; maxPixels?: number; ignored: string[] } = { ignored: [] };
  for (const [k, v] of Object.entries(obj)) {
    if (k === 'min_pixels' || k === 'max_pixels') {
      if (typeof v !== 'number' || !Number.isInteger(v) || v < 1) {
        throw new CliUsageError(`argument ${flag}: ${k} must be a positive integer, got ${JSON.stringify(v)}`);
      }
      if (k === 'min_pixels') out.minPixels = v;
      else out.maxPixels = v;
    } else {
      out.ignored.push(k);
    }
  }
  if (out.minPixels !== undefined && out.maxPixels !== undefined && out.minPixels > out.maxPixels) {
    throw new CliUsageError(`argument ${flag}: min_pixels (${out.minPixels}) is above max_pixels (${out.maxPixels})`);
  }
  return out;
}

/**
 * Checks the vLLM flags and turns them into settings; throws CliUsageError for anything a user
 * must fix. `env` supplies VLLM_API_KEY when --api-key is absent (vLLM: the flag wins).
 */
export function vllmCompatConfig(values: Record<string, ParsedValue>, env: NodeJS.ProcessEnv = process.env): VllmCompatConfig {
  const notes: string[] = [];
  for (const [key, flag] of [['tensorParallelSize', 'tensor-parallel-size'], ['pipelineParallelSize', 'pipeline-parallel-size']] as const) {
    const v = values[key];
    if (typeof v === 'number' && v !== 1) {
      throw new CliUsageError(
        `argument --${flag}: only 1 is supported, got ${v}: caprl serve runs the model in one process on one device ` +
        '(start one server per device and balance requests across them instead)',
      );
    }
  }

  const gmu = values.gpuMemoryUtilization;
  if (typeof gmu === 'number') checkGpuMemoryUtilization(gmu);  // before any download; serve.ts applies it
  if (given(values, 'trustRemoteCode')) {
    notes.push('--trust-remote-code is accepted but has no effect: caprl serve never runs code from a model folder');
  }
  if (given(values, 'enablePrefixCaching')) {
    notes.push(`--${values.enablePrefixCaching ? '' : 'no-'}enable-prefix-caching is accepted but has no effect: prompts are not cached across requests`);
  }
  if (given(values, 'enableLogRequests') && !given(values, 'disableLogRequests')) {
    notes.push('--enable-log-requests is accepted; one log line per request is already the default here');
  }

  let limitImagesPerPrompt = VLLM_DEFAULT_MM_LIMIT;
  const lim = values.limitMmPerPrompt;
  if (typeof lim === 'string') {
    const parsed = parseLimitMmPerPrompt(lim);
    if (parsed.image !== undefined) limitImagesPerPrompt = parsed.image;
    const others = Object.entries(parsed).filter(([k, v]) => k !== 'image' && v > 0).map(([k]) => k);
    if (others.length > 0) notes.push(`--limit-mm-per-prompt: ${others.join(', ')} inputs are not supported by this server; only the image limit applies`);
  }

  let minPixels: number = LLAMA_CPP_QWEN25VL_LIMITS.minPixels;
  let maxPixels: number = LLAMA_CPP_QWEN25VL_LIMITS.maxPixels;
  const mpk = values.mmProcessorKwargs;
  if (typeof mpk === 'string') {
    const parsed = parseMmProcessorKwargs(mpk);
    const clamp = (name: string, v: number): number => {
      const c = Math.min(Math.max(v, LLAMA_CPP_QWEN25VL_LIMITS.minPixels), LLAMA_CPP_QWEN25VL_LIMITS.maxPixels);
      if (c !== v) {
        notes.push(
          `--mm-processor-kwargs ${name}=${v} is outside what the vision encoder takes ` +
          `(${LLAMA_CPP_QWEN25VL_LIMITS.minPixels}..${LLAMA_CPP_QWEN25VL_LIMITS.maxPixels} px); using ${c}`,
        );
      }
      return c;
    };
    if (parsed.minPixels !== undefined) minPixels = clamp('min_pixels', parsed.minPixels);
    if (parsed.maxPixels !== undefined) maxPixels = clamp('max_pixels', parsed.maxPixels);
    if (minPixels > maxPixels) minPixels = maxPixels;
    for (const k of parsed.ignored) notes.push(`--mm-processor-kwargs "${k}" is accepted but has no effect (only min_pixels and max_pixels do)`);
  }

  let allowedLocalMediaPath: string | undefined;
  const almp = values.allowedLocalMediaPath;
  if (typeof almp === 'string' && almp !== '') {
    let real: string;
    try {
      real = realpathSync(path.resolve(almp));
    } catch {
      throw new CliUsageError(`argument --allowed-local-media-path: ${almp} does not exist`);
    }
    if (!statSync(real).isDirectory()) throw new CliUsageError(`argument --allowed-local-media-path: ${almp} is not a directory`);
    allowedLocalMediaPath = real;
  }

  const maxLogprobs = typeof values.maxLogprobs === 'number' ? values.maxLogprobs : VLLM_DEFAULT_MAX_LOGPROBS;
  if (maxLogprobs < 0) throw new CliUsageError(`argument --max-logprobs: must be non-negative, got ${maxLogprobs}`);

  const flagKeys = values.apiKey;
  const apiKeys = (Array.isArray(flagKeys) && flagKeys.length > 0 ? flagKeys : [env.VLLM_API_KEY ?? '']).filter((k) => k !== '');

  return {
    apiKeys,
    limitImagesPerPrompt,
    minPixels,
    maxPixels,
    allowedLocalMediaPath,
    maxLogprobs,
    logRequests: values.disableLogRequests !== true,
    notes,
  };
}
