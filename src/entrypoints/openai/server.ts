// The Fastify app: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
// GET|POST /ping, GET /version, POST /tokenize, POST /detokenize (vllm serve's endpoints), with
// --api-key on /v1/*. Every error a client can cause (bad JSON, oversized body, unknown route,
// wrong method, invalid fields, missing key) comes back as OpenAI's error object; nothing a
// request carries can crash the process.
import Fastify, { LogController, type FastifyInstance, type FastifyReply, type FastifyServerOptions } from 'fastify';
import type { Engine } from '../../engine/engine.js';
import { imageSourceOptionsFromEnv, type ImageSourceOptions } from '../../images/image-source.js';
import type { PrepareOptions } from '../../images/prepare.js';
import { LLAMA_CPP_QWEN25VL_LIMITS } from '../../images/qwen-resize.js';
import { installApiKeyAuth } from '../../serving/auth.js';
import { createChatCompletionHandler } from './chat.js';
import { installOperations, requestId, type OperationsOptions } from './operations.js';
import { ApiError, notFound, toApiError } from '../../serving/errors.js';
import type { ModelList } from '../../serving/protocol.js';
import { registerVllmRoutes } from './vllm-routes.js';
import type { ServingContext } from '../../serving/context.js';

export interface ServerOptions {
  engine: Engine;
  /** Names clients may use in `model`; the first is reported as the default. */
  servedModelNames: readonly string[];
  /** The model path, reported as `root` in /v1/models. */
  modelPath: string;
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
  /** Bearer keys required on /v1/* (--api-key / VLLM_API_KEY); none = open. */
  apiKeys?: readonly string[];
  /** Most images per request (--limit-mm-per-prompt); default 999, vLLM V1's. */
  limitImagesPerPrompt?: number;
  /** Image URL fetching / file:// access; defaults from the environment (VLLM_IMAGE_FETCH_TIMEOUT ...). */
  imageSource?: ImageSourceOptions;
  /** Most top logprobs a request may ask for (--max-logprobs, default 20). */
  maxLogprobs?: number;
  /** The engine's sequence slots (--max-num-seqs): the largest `n`. */
  maxNumSeqs?: number;
  /** One log line per request (default true; --disable-log-requests turns it off). */
  logRequests?: boolean;
  /** Back-pressure, timeouts, /metrics (operations.ts): --max-waiting-requests, --request-timeout ... */
  operations?: OperationsOptions;
  /** More routes on the same app and settings (`caprl serve` mounts the workflows' here). */
  mount?: (app: FastifyInstance, ctx: ServingContext) => void;
}

export const DEFAULT_BODY_LIMIT = 64 * 1024 * 1024;

export function buildServer(opts: ServerOptions): FastifyInstance {
  const { engine } = opts;
  if (opts.servedModelNames.length === 0) throw new Error('servedModelNames must not be empty');
  const app = Fastify({
    logger: opts.logger ?? false,
    bodyLimit: opts.bodyLimit ?? DEFAULT_BODY_LIMIT,
    // One log line per request comes from operations.ts instead (with the generation's outcome).
    logController: new LogController({ disableRequestLogging: true }),
    // operations.ts answers requests during shutdown with OpenAI's error object instead.
    return503OnClosing: false,
    genReqId: requestId,
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
  installApiKeyAuth(app, opts.apiKeys ?? []);
  app.setNotFoundHandler((request, reply) => {
    const path = request.url.split('?')[0]!;
    // A known path asked with the wrong method: 405, as vLLM (FastAPI) answers.
    const allowed = ['GET', 'POST'].filter((method) => app.hasRoute({ method: method as 'GET' | 'POST', url: path }));
    if (allowed.length > 0) {
      const e = new ApiError(405, `Method Not Allowed: ${request.method} ${path} (use ${allowed.join(' or ')})`, 'invalid_request_error', null, 'method_not_allowed');
      void reply.code(405).header('allow', allowed.join(', ')).send(e.toJSON());
      return;
    }
    const e = notFound(`Not Found: ${request.method} ${path}`);
    void reply.code(404).send(e.toJSON());
  });

  const created = Math.floor(Date.now() / 1000);
  // The engine's per-request limit, checked by the engine itself (once, with the prompt's images).
  const maxModelLen = engine.info.maxModelLen;
  // /metrics, admission (429/503), --request-timeout, one log line per request.
  installOperations(app, {
    maxNumSeqs: opts.maxNumSeqs,
    logRequests: opts.logRequests,
    ...opts.operations,
    engine,
    modelName: opts.servedModelNames[0]!,
    maxModelLen,
    isAccepting: () => accepting,
  });

  const imageOptions = opts.imageOptions ?? { ...LLAMA_CPP_QWEN25VL_LIMITS };
  const imageSource = opts.imageSource ?? imageSourceOptionsFromEnv();
  const limitImagesPerPrompt = opts.limitImagesPerPrompt ?? 999;
  // One set of handler options for chat, the other vLLM routes and whatever is mounted.
  const handlerOptions: ServingContext = {
    engine,
    servedModelNames: opts.servedModelNames,
    imageOptions,
    imageSource,
    limitImagesPerPrompt,
    maxLogprobs: opts.maxLogprobs,
    maxNumSeqs: opts.maxNumSeqs,
    seed: opts.seed,
    logRequests: opts.logRequests,
    isAccepting: () => accepting,
  };
  app.post('/v1/chat/completions', createChatCompletionHandler(handlerOptions));
  registerVllmRoutes(app, handlerOptions);
  opts.mount?.(app, handlerOptions);

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

  const health = async (_request: unknown, reply: FastifyReply): Promise<FastifyReply> => {
    if (!accepting) return reply.code(503).send();
    return reply.code(200).send();
  };
  app.get('/health', health);
  // vLLM (SageMaker): /ping answers as /health, to GET and POST.
  app.get('/ping', health);
  app.post('/ping', health);

  return app;
}
