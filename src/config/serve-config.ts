// `caprl serve`'s flags and defaults, in one place: the flags (vLLM's names) -> a checked
// ServeConfig -> EngineOptions. The serve command and the workflows' in-process engine share them.
import { existsSync, readFileSync, statSync } from 'node:fs';
import type { EngineOptions, GpuDevice, VisionEncoderKind } from '../engine/native-types.js';
import { loadAddon } from '../engine/native.js';
import { ADMISSION_FLAGS, admissionConfigFromArgs, type AdmissionConfig } from './admission-config.js';
import { CliUsageError, int, str, type CommandSpec, type FlagSpec, type ParsedValue } from './cli-args.js';
import { DEFAULT_KV_CACHE_TOKENS, checkKvCacheFlags, kvCacheOnGpu, kvCacheSizing, type KvCacheFlags } from './kv-cache-sizing.js';
import { VLLM_COMPAT_FLAGS, vllmCompatConfig, type VllmCompatConfig } from './vllm-flags.js';

/** Where a model comes from and how it is converted (vLLM's names; src/hub/model-source.ts reads them). */
export const MODEL_SOURCE_FLAGS: FlagSpec[] = [
  { name: 'revision', type: 'string', dest: 'revision', help: 'branch, tag or commit of a Hugging Face repo-id MODEL (default: main)' },
  { name: 'download-dir', type: 'string', dest: 'downloadDir', metavar: 'DIR', help: 'Hugging Face cache to download into and read from (default: $HF_HUB_CACHE, else $HF_HOME/hub)' },
  { name: 'dtype', type: 'string', dest: 'dtype', choices: ['auto', 'bfloat16', 'bf16', 'float16', 'f16', 'half'], help: 'weight type when converting safetensors to GGUF; auto: bf16 for bf16 weights, else f16 (default: auto)' },
  { name: 'quantization', aliases: ['q'], type: 'string', dest: 'quantization', metavar: 'TYPE', help: 'quantize when converting safetensors: q8_0 (q4_k_m and other k-quants: not supported yet)' },
];

/**
 * The engine's limits, as it states them: MAX_NUM_SEQS is llama.cpp's most sequences in one
 * context, AUTO_MIN_NUM_SEQS the fewest that --max-num-seqs' default gives.
 */
export const { maxSeqs: MAX_NUM_SEQS, autoMinSeqs: AUTO_MIN_NUM_SEQS } = loadAddon().engineLimits();

export const SERVE_DEFAULTS = {
  port: 8000,
  maxModelLen: 8192,
  maxNumBatchedTokens: 2048,
  threads: 0,
  nGpuLayers: -1,
  logLevel: 'info',
} as const;

export const SERVE_SPEC: CommandSpec = {
  usage: 'caprl serve',
  summary: 'Serve CapRL / Qwen2.5-VL (a GGUF, a Hugging Face folder or repo id) through an OpenAI-compatible API (like `vllm serve`).',
  positionals: [{ dest: 'modelTag', metavar: 'MODEL', help: 'text model GGUF, Hugging Face model folder, or Hub repo id like internlm/CapRL-3B (same as --model)' }],
  flags: [
    { name: 'model', type: 'string', dest: 'model', metavar: 'PATH', help: 'path of the text model GGUF' },
    { name: 'mmproj', type: 'string', dest: 'mmproj', metavar: 'PATH', help: 'path of the vision projector GGUF; without it image requests are refused' },
    ...MODEL_SOURCE_FLAGS, // --revision, --download-dir, --dtype, --quantization
    { name: 'host', type: 'string', dest: 'host', help: 'address to listen on (default: all interfaces, as vLLM)' },
    { name: 'port', type: 'int', dest: 'port', help: `port to listen on (default: ${SERVE_DEFAULTS.port})` },
    { name: 'served-model-name', type: 'strings', dest: 'servedModelName', metavar: 'NAME', help: 'model name(s) clients use in `model`; the first is the default (default: the model path)' },
    { name: 'max-model-len', type: 'int', dest: 'maxModelLen', help: `context length per request, prompt + completion, in tokens (default: ${SERVE_DEFAULTS.maxModelLen})` },
    { name: 'kv-cache-tokens', type: 'int', dest: 'kvCacheTokens', help: `KV cache size in tokens, shared by all running requests (default: sized by --gpu-memory-utilization where a GPU holds it, else max(${DEFAULT_KV_CACHE_TOKENS}, --max-model-len))` },
    { name: 'kv-cache-memory-bytes', type: 'int', dest: 'kvCacheMemoryBytes', metavar: 'BYTES', help: 'KV cache size in bytes, as vLLM: as many tokens as fit (overrides --gpu-memory-utilization)' },
    { name: 'max-num-seqs', type: 'int', dest: 'maxNumSeqs', help: `most requests decoded together, at most ${MAX_NUM_SEQS} (default: as many as the KV cache holds at --max-model-len, ${AUTO_MIN_NUM_SEQS} to ${MAX_NUM_SEQS})` },
    { name: 'max-num-batched-tokens', type: 'int', dest: 'maxNumBatchedTokens', help: `most tokens in one engine step (default: ${SERVE_DEFAULTS.maxNumBatchedTokens})` },
    { name: 'ubatch-size', type: 'int', dest: 'ubatchSize', help: "rows per pass over the weights, as llama-server's -ub: a longer prompt chunk goes in several (default: min(--max-num-batched-tokens, 512))" },
    { name: 'threads', type: 'int', dest: 'threads', help: 'CPU threads (default: 0 = llama.cpp picks)' },
    { name: 'n-gpu-layers', type: 'int', dest: 'nGpuLayers', help: 'layers offloaded to the GPU, -1 = all (default: -1; ignored on CPU builds)' },
    { name: 'vision-encoder', type: 'string', dest: 'visionEncoder', choices: ['llama.cpp', 'caprl'], help: "image encoder: llama.cpp's clip (one image at a time) or caprl's batched Qwen2.5-VL encoder (default: llama.cpp)" },
    { name: 'chat-template', type: 'string', dest: 'chatTemplate', metavar: 'FILE_OR_TEMPLATE', help: "jinja chat template overriding the model's: a file path or the template itself" },
    { name: 'seed', type: 'int', dest: 'seed', help: 'server-wide seed: requests without `seed` draw reproducible seeds from it' },
    { name: 'uvicorn-log-level', type: 'string', dest: 'logLevel', choices: ['critical', 'error', 'warning', 'info', 'debug', 'trace'], help: `HTTP server log level (default: ${SERVE_DEFAULTS.logLevel})` },
    ...VLLM_COMPAT_FLAGS, // --api-key, --limit-mm-per-prompt, --tensor-parallel-size ... (vllm-flags.ts)
    ...ADMISSION_FLAGS, // --max-waiting-requests, --request-timeout, --shutdown-timeout (admission-config.ts)
  ],
};

export interface ServeConfig {
  model: string;
  mmproj?: string;
  host?: string;
  port: number;
  servedModelNames: string[];
  maxModelLen: number;
  /** KV cache flags as given; engineOptionsFor settles the size once it knows the devices. */
  kvCache: KvCacheFlags;
  /** As given; unset, the engine takes as many as its KV cache holds (EngineInfo.maxSeqs). */
  maxNumSeqs?: number;
  maxNumBatchedTokens: number;
  /** Unset: min(maxNumBatchedTokens, 512), llama.cpp's default. */
  ubatchSize?: number;
  threads: number;
  nGpuLayers: number;
  /** Unset: the engine's default (llama.cpp). */
  visionEncoder?: VisionEncoderKind;
  chatTemplate?: string;
  seed?: number;
  logLevel: string;
  /** The vLLM flags' settings (api keys, image limits, notes for flags without effect). */
  vllm: VllmCompatConfig;
  /** Back-pressure and lifetime: --max-waiting-requests, --request-timeout, --shutdown-timeout. */
  admission: AdmissionConfig;
}

/**
 * --chat-template as vLLM reads it: a readable file is read; otherwise, a value with jinja-ish
 * characters ({, }, newline) is the template itself (with \n-style escapes decoded), and
 * anything else is a path that failed to open.
 */
export function resolveChatTemplate(value: string): string {
  try {
    if (existsSync(value) && statSync(value).isFile()) return readFileSync(value, 'utf8');
  } catch {
    // fall through: not a readable file
  }
  if (!/[{}\n]/.test(value)) {
    throw new CliUsageError(`the chat template "${value}" looks like a file path, but it could not be opened`);
  }
  return value.replace(/\\(n|t|r|\\|"|')/g, (_m, c: string) => ({ n: '\n', t: '\t', r: '\r' } as Record<string, string>)[c] ?? c);
}

const FASTIFY_LEVELS: Record<string, string> = {
  critical: 'fatal', error: 'error', warning: 'warn', info: 'info', debug: 'debug', trace: 'trace',
};

/** Flags -> a checked configuration. Throws CliUsageError for anything a user must fix. */
export function serveConfigFromArgs(values: Record<string, ParsedValue>, env: NodeJS.ProcessEnv = process.env): ServeConfig {
  const tag = str(values, 'modelTag');
  const flagModel = str(values, 'model');
  if (tag && flagModel && tag !== flagModel) {
    throw new CliUsageError(`the model is given twice, as "${tag}" and as --model "${flagModel}"`);
  }
  const model = tag ?? flagModel;
  if (!model) throw new CliUsageError('a model is required: caprl serve MODEL.gguf --mmproj MMPROJ.gguf');
  if (!existsSync(model)) throw new CliUsageError(`model file not found: ${model}`);
  const mmproj = str(values, 'mmproj');
  if (mmproj !== undefined && !existsSync(mmproj)) throw new CliUsageError(`mmproj file not found: ${mmproj}`);

  const positive = (key: string, flag: string, def: number): number => {
    const v = int(values, key) ?? def;
    if (v < 1) throw new CliUsageError(`argument --${flag}: must be at least 1, got ${v}`);
    return v;
  };
  const port = int(values, 'port') ?? SERVE_DEFAULTS.port;
  if (port < 0 || port > 65535) throw new CliUsageError(`argument --port: must be in [0, 65535], got ${port}`);
  const maxModelLen = positive('maxModelLen', 'max-model-len', SERVE_DEFAULTS.maxModelLen);
  const gmu = values.gpuMemoryUtilization;
  const kvCache = checkKvCacheFlags({
    tokens: int(values, 'kvCacheTokens'),
    bytes: int(values, 'kvCacheMemoryBytes'),
    gpuMemoryUtilization: typeof gmu === 'number' ? gmu : undefined,
  }, maxModelLen);
  const threads = int(values, 'threads') ?? SERVE_DEFAULTS.threads;
  if (threads < 0) throw new CliUsageError(`argument --threads: must be non-negative, got ${threads}`);
  const chatTemplateRaw = str(values, 'chatTemplate');
  const served = values.servedModelName;
  const vllm = vllmCompatConfig(values, env);
  let maxNumSeqs = values.maxNumSeqs === undefined ? undefined : positive('maxNumSeqs', 'max-num-seqs', 1);
  if (maxNumSeqs !== undefined && maxNumSeqs > MAX_NUM_SEQS) {
    // vLLM takes any count; llama.cpp decodes at most 256 sequences together.
    vllm.notes.push(`--max-num-seqs ${maxNumSeqs}: llama.cpp decodes at most ${MAX_NUM_SEQS} sequences together; using ${MAX_NUM_SEQS}`);
    maxNumSeqs = MAX_NUM_SEQS;
  }
  return {
    model,
    mmproj,
    host: str(values, 'host'),
    port,
    servedModelNames: Array.isArray(served) && served.length > 0 ? served : [model],
    maxModelLen,
    kvCache,
    maxNumSeqs,
    maxNumBatchedTokens: positive('maxNumBatchedTokens', 'max-num-batched-tokens', SERVE_DEFAULTS.maxNumBatchedTokens),
    ubatchSize: values.ubatchSize === undefined ? undefined : positive('ubatchSize', 'ubatch-size', 512),
    threads,
    nGpuLayers: int(values, 'nGpuLayers') ?? SERVE_DEFAULTS.nGpuLayers,
    visionEncoder: str(values, 'visionEncoder') as VisionEncoderKind | undefined,
    chatTemplate: chatTemplateRaw === undefined ? undefined : resolveChatTemplate(chatTemplateRaw),
    seed: int(values, 'seed'),
    logLevel: FASTIFY_LEVELS[str(values, 'logLevel') ?? SERVE_DEFAULTS.logLevel] ?? 'info',
    vllm,
    admission: admissionConfigFromArgs(values),
  };
}

/**
 * EngineOptions for a config: the KV cache flags size the shared pool (kv-cache-sizing.ts: which
 * applies depends on whether one of `gpus` holds it), --max-model-len each request.
 */
export function engineOptionsFor(cfg: ServeConfig, gpus: readonly GpuDevice[] = loadAddon().gpuDevices()): EngineOptions {
  return {
    model: cfg.model,
    mmproj: cfg.mmproj,
    ...kvCacheSizing(cfg.kvCache, cfg.maxModelLen, kvCacheOnGpu(gpus, cfg.nGpuLayers)),
    maxModelLen: cfg.maxModelLen,
    maxSeqs: cfg.maxNumSeqs ?? 0,
    nBatch: cfg.maxNumBatchedTokens,
    ...(cfg.ubatchSize !== undefined ? { nUbatch: cfg.ubatchSize } : {}),
    nThreads: cfg.threads,
    nGpuLayers: cfg.nGpuLayers,
    visionEncoder: cfg.visionEncoder,
    chatTemplate: cfg.chatTemplate,
  };
}
