// The Fastify app: POST /v1/chat/completions, GET /v1/models, GET /health. Every error a
// client can cause (bad JSON, oversized body, unknown route, invalid fields) comes back as
// OpenAI's error object; nothing a request carries can crash the process.
import Fastify, { LogController, type FastifyInstance, type FastifyServerOptions } from 'fastify';
import type { Engine } from '../../engine/engine.js';
import type { PrepareOptions } from '../../images/prepare.js';
import { LLAMA_CPP_QWEN25VL_LIMITS } from '../../images/qwen-resize.js';
import { createChatCompletionHandler } from './chat.js';
import { notFound, toApiError } from './errors.js';
import type { ModelList } from './protocol.js';

export interface ServerOptions {
  engine: Engine;
  /** Names clients may use in `model`; the first is reported as the default. */
  servedModelNames: readonly string[];
  /** The model path, reported as `root` in /v1/models. */
  modelPath: string;
  /** Per-request context limit (prompt + completion) in tokens; default engine.info.nCtx. */
  maxModelLen?: number;
  /** Largest request body in bytes (base64 images are large); default 64 MiB. */
  bodyLimit?: number;
  /**
   * Image resize limits. Default: llama.cpp mtmd's Qwen2.5-VL limits (6272 .. 3211264 px), the
   * ones the engine applies, so what we send is never resized again and our prompt-token count
   * is exact. HF/vLLM use 3136 .. 12845056; those need the engine to raise mtmd's
   * image_min_tokens / image_max_tokens to 4 / 16384 first.
   */
  imageOptions?: PrepareOptions;
  /** Server-wide seed: requests without `seed` get seeds drawn from it, in arrival order (vLLM --seed). */
  seed?: number;
  logger?: FastifyServerOptions['logger'];
}

export const DEFAULT_BODY_LIMIT = 64 * 1024 * 1024;

export function buildServer(opts: ServerOptions): FastifyInstance {
  const { engine } = opts;
  if (opts.servedModelNames.length === 0) throw new Error('servedModelNames must not be empty');
  const app = Fastify({
    logger: opts.logger ?? false,
    bodyLimit: opts.bodyLimit ?? DEFAULT_BODY_LIMIT,
    // One log line per completion comes from the chat handler instead.
    logController: new LogController({ disableRequestLogging: true }),
    return503OnClosing: true,
    forceCloseConnections: 'idle',
  });
  // Only JSON bodies: text/plain would otherwise reach validation as a string.
  app.removeContentTypeParser('text/plain');
  let accepting = true;
  app.addHook('preClose', async () => {
    accepting = false;
  });

  app.setErrorHandler((err, request, reply) => {
    const apiErr = toApiError(err);
    if (apiErr.status >= 500) request.log.error({ err }, 'request failed');
    void reply.code(apiErr.status).type('application/json').send(apiErr.toJSON());
  });
  app.setNotFoundHandler((request, reply) => {
    const e = notFound(`Not Found: ${request.method} ${request.url.split('?')[0]}`);
    void reply.code(404).send(e.toJSON());
  });

  const created = Math.floor(Date.now() / 1000);
  const maxModelLen = Math.min(opts.maxModelLen ?? engine.info.nCtx, engine.info.nCtx);

  app.post('/v1/chat/completions', createChatCompletionHandler({
    engine,
    servedModelNames: opts.servedModelNames,
    maxModelLen,
    imageOptions: opts.imageOptions ?? { ...LLAMA_CPP_QWEN25VL_LIMITS },
    seed: opts.seed,
    isAccepting: () => accepting,
  }));

  app.get('/v1/models', async (): Promise<ModelList> => ({
    object: 'list',
    data: opts.servedModelNames.map((id) => ({
      id,
      object: 'model',
      created,
      owned_by: 'caprl',
      root: opts.modelPath,
      parent: null,
      max_model_len: maxModelLen,
    })),
  }));

  app.get('/health', async (_request, reply) => {
    if (!accepting) return reply.code(503).send();
    return reply.code(200).send();
  });

  return app;
}
