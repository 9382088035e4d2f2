// `caprl serve`: the vllm serve replacement. Parses flags, opens the engine (model + mmproj),
// starts the HTTP server, and shuts down on SIGINT/SIGTERM: the first signal stops accepting
// and lets running requests finish for up to --shutdown-timeout seconds, a second one (or the
// end of that time) cancels them; the process then exits 0.
import { existsSync, readFileSync, statSync } from 'node:fs';
import sharp from 'sharp';
import { Engine } from '../../engine/engine.js';
import type { EngineOptions, GpuDevice, VisionEncoderKind } from '../../engine/native-types.js';
import { loadAddon } from '../../engine/native.js';
import { DEFAULT_KV_CACHE_TOKENS, checkKvCacheFlags, describeKvCache, kvCacheOnGpu, kvCacheSizing, type KvCacheFlags } from './kv-cache-sizing.js';
import { CliFatalError, CliUsageError, int, parseArgsOrHelp, str, type CommandSpec, type ParsedValue } from '../cli-args.js';
import { buildServer } from './server.js';
import { ADMISSION_FLAGS, admissionConfigFromArgs, type AdmissionConfig } from './admission.js';
import { GracefulShutdown } from './shutdown.js';
import { MODEL_SOURCE_FLAGS, resolveServeModel } from '../../hub/model-source.js';
import { imageSourceOptionsFromEnv } from '../../images/image-source.js';
import { VLLM_COMPAT_FLAGS, vllmCompatConfig, type VllmCompatConfig } from './vllm-flags.js';

/** llama.cpp's limit on sequences in one context (llama_max_parallel_sequences). */
export const MAX_NUM_SEQS = 256;
/** The fewest sequences the default gives (native/engine.cpp kAutoMinSeqs). */
export const AUTO_MIN_NUM_SEQS = 16;

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
    ...MODEL_SOURCE_FLAGS, // --revision, --download-dir, --dtype, --quantization (src/hub/model-source.ts)
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
    ...ADMISSION_FLAGS, // --max-waiting-requests, --request-timeout, --shutdown-timeout (admission.ts)
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

/** Runs `caprl serve ARGS`; resolves with the exit code once the server has shut down. */
export async function runServe(argv: readonly string[]): Promise<number> {
  const values = parseArgsOrHelp(SERVE_SPEC, argv);
  if (!values) return 0;
  // vLLM flags first (e.g. --tensor-parallel-size 2), before any download.
  vllmCompatConfig(values);
  // A Hugging Face folder or repo id becomes a GGUF pair here (download + conversion, cached).
  const cfg = serveConfigFromArgs(await resolveServeModel(values));

  let engine: Engine;
  try {
    engine = new Engine(engineOptionsFor(cfg));
  } catch (err) {
    throw new CliFatalError(`could not load the model: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
  }
  const app = buildServer({
    engine,
    servedModelNames: cfg.servedModelNames,
    modelPath: cfg.model,
    maxModelLen: cfg.maxModelLen,
    seed: cfg.seed,
    logger: { level: cfg.logLevel },
    apiKeys: cfg.vllm.apiKeys,
    limitImagesPerPrompt: cfg.vllm.limitImagesPerPrompt,
    imageOptions: { minPixels: cfg.vllm.minPixels, maxPixels: cfg.vllm.maxPixels },
    imageSource: {
      ...imageSourceOptionsFromEnv(),
      allowedLocalMediaPath: cfg.vllm.allowedLocalMediaPath,
      allowPrivateImageUrls: cfg.admission.allowPrivateImageUrls,
    },
    maxLogprobs: cfg.vllm.maxLogprobs,
    maxNumSeqs: engine.info.maxSeqs,
    logRequests: cfg.vllm.logRequests,
    operations: {
      maxWaitingRequests: cfg.admission.maxWaitingRequests,
      requestTimeoutMs: cfg.admission.requestTimeoutMs,
      logRequests: cfg.vllm.logRequests, // --disable-log-requests silences the per-request line
    },
  });
  // Every request's image is new: libvips' operation cache (50 MB by default) would only hold memory.
  sharp.cache(false);
  // One line per vLLM flag accepted without (full) effect.
  for (const note of cfg.vllm.notes) app.log.warn(note);
  if (cfg.vllm.apiKeys.length > 0) app.log.info(`API key required on /v1/* (${cfg.vllm.apiKeys.length} key${cfg.vllm.apiKeys.length > 1 ? 's' : ''})`);
  if (cfg.admission.allowPrivateImageUrls) app.log.warn('image URLs may reach private, loopback and link-local addresses (--allow-private-image-urls)');
  if (cfg.vllm.allowedLocalMediaPath) app.log.warn(`file:// images may be read from ${cfg.vllm.allowedLocalMediaPath} (--allowed-local-media-path)`);
  const info = engine.info;
  if (cfg.mmproj && !info.hasVision) app.log.warn(`${cfg.mmproj} loaded but reports no vision support`);
  if (info.hasVision && !info.imagePromptRows) app.log.warn("the model's token-embedding table cannot be read: image prompts' text goes in passes of its own");
  if (!cfg.mmproj) app.log.warn('no --mmproj given: image requests will be refused');

  let address: string;
  try {
    // vLLM binds every interface unless --host says otherwise (Fastify alone would pick localhost).
    address = await app.listen({ host: cfg.host ?? '0.0.0.0', port: cfg.port });
  } catch (err) {
    await engine.close();
    const code = (err as { code?: string }).code;
    if (code === 'EADDRINUSE' || code === 'EACCES' || code === 'EADDRNOTAVAIL') {
      throw new CliFatalError(`could not listen on ${cfg.host ?? '0.0.0.0'}:${cfg.port}: ${(err as Error).message}`, { cause: err });
    }
    throw err;
  }
  app.log.info(
    `serving ${cfg.servedModelNames.map((n) => `"${n}"`).join(', ')} on ${address}/v1 ` +
    `(model ${cfg.model}${cfg.mmproj ? ` + ${cfg.mmproj}` : ''}; max_model_len ${Math.min(cfg.maxModelLen, info.nCtx)}, ` +
    `${info.maxSeqs} seqs${cfg.maxNumSeqs === undefined ? ' (as the KV cache holds)' : ''}; devices: ${info.devices.join(', ') || 'CPU'}; ${info.nGpuLayers}/${info.nLayers} layers on GPU; ` +
    `CPU threads: model ${info.threads.model}${info.threads.vision ? `, vision ${info.threads.vision}${info.threads.cpuTurns ? ', by turns' : ''}` : ''})`,
  );
  app.log.info(describeKvCache(info.kvCache, info.visionEncoder));
  if (cfg.kvCache.gpuMemoryUtilization !== undefined && info.kvCache.sizedBy !== 'memory-fraction') {
    app.log.warn(`--gpu-memory-utilization has no effect here: ${info.kvCache.onGpu ? 'the KV cache size is given' : 'no GPU holds the KV cache'}`);
  }

  return new Promise<number>((resolve) => {
    const shutdown = new GracefulShutdown(app, engine, { graceMs: cfg.admission.shutdownTimeoutMs, log: app.log });
    let stopping = false;
    const onSignal = (signal: NodeJS.Signals): void => {
      if (stopping) {
        app.log.warn(`${signal} again: cancelling running requests`);
        shutdown.now();
        return;
      }
      stopping = true;
      app.log.info(
        `${signal}: shutting down (running requests may finish within ${cfg.admission.shutdownTimeoutMs / 1000} s; ` +
        'send it again to cancel them now)',
      );
      void (async () => {
        const { closeFailed } = await shutdown.run();
        if (closeFailed) app.log.error('error while closing the HTTP server');
        const code = closeFailed ? 1 : 0;
        process.off('SIGINT', onSignal);
        process.off('SIGTERM', onSignal);
        app.log.info('shut down');
        resolve(code);
      })();
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
  });
}
