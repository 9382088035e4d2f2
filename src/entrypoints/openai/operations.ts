// What a production server needs around its routes, installed on the Fastify app in one call:
//   GET /metrics            Prometheus text (src/metrics/metrics.ts), vLLM's names
//   admission               POST /v1/*: 503 while shutting down, 429 + Retry-After when full
//   request timeout         --request-timeout cancels the generation, the client gets 504
//   one log line per request  request id, method, path, status, time, and for generations the
//                           finish reason and token counts; never bodies, never image bytes
//   x-request-id            a client's (or proxy's) X-Request-Id is kept as the request id and echoed
// Every generation a request's handler starts (engine.generate, from any route) is measured
// without the handler's help: the handler runs inside an AsyncLocalStorage scope holding the
// request's state, the engine tells the app of each new Generation (Engine.onGeneration), and the
// observer reads its events as the handler reads them (Generation.readThrough, src/metrics/observe.ts).
// The request timeout is the handler's own business: a deadline signal it gets (serving/deadline.ts).
import { AsyncLocalStorage } from 'node:async_hooks';
import { randomUUID } from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { Engine, GenerateInput, Generation } from '../../engine/engine.js';
import { ServerMetrics } from '../../metrics/metrics.js';
import { setRequestDeadline } from '../../serving/deadline.js';
import { observeGeneration as observeEvents, type ChoiceSummary } from '../../metrics/observe.js';
import { ADMISSION_DEFAULTS } from '../../config/admission-config.js';
import { Admission, queueFullError, shuttingDownError, timeoutError } from './admission.js';

export interface OperationsOptions {
  /** --max-num-seqs: requests that run at once (default: the engine's maxSeqs). */
  maxNumSeqs?: number;
  /** --max-waiting-requests (default 1024). */
  maxWaitingRequests?: number;
  /** --request-timeout in ms; 0 or absent = none. */
  requestTimeoutMs?: number;
  /** Retry-After seconds on 429 (default 1). */
  retryAfterSeconds?: number;
  /** One info line per request (default true). */
  logRequests?: boolean;
  /** Node process metrics on /metrics (default true). */
  processMetrics?: boolean;
}

export interface OperationsContext extends OperationsOptions {
  engine: Engine;
  modelName: string;
  maxModelLen: number;
  /** False once the server is shutting down. */
  isAccepting: () => boolean;
}

export interface Operations {
  readonly metrics: ServerMetrics;
  readonly admission: Admission;
}

interface RequestState {
  arrivedAt: number;
  parsedAt?: number;
  admitted: boolean;
  /** Handed to the engine (observe was called). */
  generating: boolean;
  /** Its generations (a /v1/completions prompt list starts several). */
  gens: Generation[];
  timer?: NodeJS.Timeout;
  timedOut: boolean;
  images: number;
  choices: ChoiceSummary[];
  /** The app's observer (apps sharing an engine each see only their own requests' generations). */
  observe: (st: RequestState, gen: Generation, input: GenerateInput) => void;
}

/** The state of the request whose handler is running (set around every handler). */
const current = new AsyncLocalStorage<RequestState>();

const REQUEST_ID_RE = /^[\w.:@/+=-]{1,128}$/;

/** Fastify genReqId: a well-formed X-Request-Id from the client or a proxy, else a fresh UUID. */
export function requestId(req: IncomingMessage): string {
  const h = req.headers['x-request-id'];
  const v = Array.isArray(h) ? h[0] : h;
  return v !== undefined && REQUEST_ID_RE.test(v) ? v : randomUUID();
}

/** Handlers vLLM's instrumentator leaves out of http_* metrics. */
const UNMEASURED = new Set(['/metrics', '/health', '/load', '/ping', '/version']);

function isGenerationRoute(request: FastifyRequest): boolean {
  return request.method === 'POST' && request.url.startsWith('/v1/');
}

export function installOperations(app: FastifyInstance, ctx: OperationsContext): Operations {
  const { engine } = ctx;
  const admission = new Admission(
    ctx.maxNumSeqs ?? engine.info.maxSeqs,
    ctx.maxWaitingRequests ?? ADMISSION_DEFAULTS.maxWaitingRequests,
  );
  const retryAfter = ctx.retryAfterSeconds ?? ADMISSION_DEFAULTS.retryAfter;
  const timeoutMs = ctx.requestTimeoutMs ?? 0;
  const logRequests = ctx.logRequests ?? true;
  const states = new WeakMap<FastifyRequest, RequestState>();
  let preprocessing = 0;
  const metrics = new ServerMetrics({
    modelName: ctx.modelName,
    maxModelLen: ctx.maxModelLen,
    engineStats: () => engine.stats(),
    processMetrics: ctx.processMetrics,
    preprocessing: () => preprocessing,
  });

  /** A Generation started by this request's handler: measured, and subject to the timeout. */
  const observe = (st: RequestState, gen: Generation, input: GenerateInput): void => {
    if (st.admitted && !st.generating) preprocessing--;
    st.generating = true;
    st.gens.push(gen);
    st.images += input.images.length;
    // Every consumer of the Generation (for await) reads it through the observer from now on.
    gen.readThrough((events) => observeEvents(metrics, { n: gen.n, cancel: () => gen.cancel(), [Symbol.asyncIterator]: () => events[Symbol.asyncIterator]() }, {
      arrivedAt: st.arrivedAt,
      parsedAt: st.parsedAt,
      images: input.images.length,
      maxTokens: gen.admission.then((a) => (a.accepted ? a.maxTokens : a.finish.errorKind === 'client' ? null : Math.max(input.sampling.maxTokens, 0))),
      onChoiceFinished: (c) => st.choices.push(c),
    }));
  };
  const stopObserving = engine.onGeneration((gen, input) => {
    const st = current.getStore();
    if (st?.observe === observe) observe(st, gen, input);
  });
  app.addHook('onClose', async () => {
    stopObserving();
  });

  const refuse = (reply: FastifyReply, status: number, body: unknown, headers: Record<string, string>): FastifyReply =>
    reply.code(status).headers(headers).type('application/json').send(body);

  app.addHook('onRequest', async (request, reply) => {
    const st: RequestState = {
      arrivedAt: performance.now(), admitted: false, generating: false, gens: [], timedOut: false, images: 0, choices: [], observe,
    };
    states.set(request, st);
    const res = reply.raw;
    res.setHeader('x-request-id', request.id);
    res.once('close', () => {
      const ms = performance.now() - st.arrivedAt;
      if (st.timer) clearTimeout(st.timer);
      if (st.admitted) {
        admission.release();
        if (!st.generating) preprocessing--;
      }
      // Closed before the whole response went out: the client left (nginx's 499).
      const status = res.writableFinished ? res.statusCode : 499;
      const handler = request.routeOptions.url ?? 'none';
      if (!UNMEASURED.has(handler)) metrics.httpRequest(request.method, handler, res.statusCode, ms / 1000);
      if (!logRequests) return;
      const line: Record<string, unknown> = { method: request.method, url: request.url.split('?')[0], status, ms: Math.round(ms) };
      if (st.images > 0) line.images = st.images;
      if (st.choices.length > 0) {
        line.finish = st.choices.length === 1 ? st.choices[0]!.reason : st.choices.map((c) => c.reason);
        line.promptTokens = st.choices.reduce((s, c) => s + (c.index === 0 ? c.promptTokens : 0), 0);
        line.completionTokens = st.choices.reduce((s, c) => s + c.completionTokens, 0);
      }
      if (st.timedOut) line.timedOut = true;
      if (status >= 500 && status !== 503) request.log.warn(line, 'request');
      else request.log.info(line, 'request');
    });

    if (!isGenerationRoute(request)) return;
    if (!ctx.isAccepting()) {
      metrics.rejectedRequest('shutting_down');
      return refuse(reply, 503, shuttingDownError().toJSON(), { connection: 'close' });
    }
    if (!admission.tryAcquire()) {
      metrics.rejectedRequest('queue_full');
      return refuse(reply, 429, queueFullError(admission, retryAfter).toJSON(), { 'retry-after': String(retryAfter) });
    }
    st.admitted = true;
    preprocessing++;
    if (timeoutMs > 0) {
      // The handler sees the deadline (serving/deadline.ts): it passes it to the engine with its
      // client's signal and answers an abort after it with its reason, the 504.
      const deadline = new AbortController();
      setRequestDeadline(request, deadline.signal);
      st.timer = setTimeout(() => {
        st.timedOut = true;
        metrics.timedOut();
        deadline.abort(timeoutError(timeoutMs));
      }, timeoutMs);
      st.timer.unref();
    }
  });

  // The handler runs synchronously from the last preHandler's done(): inside this scope.
  app.addHook('preHandler', (request, _reply, done) => {
    const st = states.get(request);
    if (!st) {
      done();
      return;
    }
    st.parsedAt = performance.now();
    current.run(st, done);
  });

  app.get('/metrics', async (_request, reply) => {
    const text = await metrics.render();
    return reply.code(200).type(metrics.contentType).send(text);
  });

  return { metrics, admission };
}
