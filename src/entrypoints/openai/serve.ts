// `caprl serve`: the vllm serve replacement. Parses flags, opens the engine (model + mmproj),
// starts the HTTP server, and shuts down on SIGINT/SIGTERM: the first signal stops accepting
// and lets running requests finish for up to --shutdown-timeout seconds, a second one (or the
// end of that time) cancels them; the process then exits 0.
import sharp from 'sharp';
import { CliFatalError, parseArgsOrHelp } from '../../config/cli-args.js';
import { describeKvCache } from '../../config/kv-cache-sizing.js';
import { SERVE_SPEC, engineOptionsFor, serveConfigFromArgs } from '../../config/serve-config.js';
import { vllmCompatConfig } from '../../config/vllm-flags.js';
import { Engine } from '../../engine/engine.js';
import { resolveServeModel } from '../../hub/model-source.js';
import { imageSourceOptionsFromEnv } from '../../images/image-source.js';
import { registerWorkflowRoutes } from '../../workflows/routes.js';
import { buildServer } from './server.js';
import { GracefulShutdown } from './shutdown.js';

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
    // CapRL workflows: POST /v1/captions (uploads), /v1/rewards/caprl and /get_reward (QA reward).
    mount: (app, ctx) => registerWorkflowRoutes(app, { ...ctx, apiKeys: cfg.vllm.apiKeys }),
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
