// A real caprl server for tests: the tiny generated model (test/helpers/models.ts), the real
// native engine, the real Fastify app on 127.0.0.1 and an ephemeral port, and an `openai`
// client pointed at it. Nothing is mocked.
import type { FastifyInstance } from 'fastify';
import OpenAI from 'openai';
import sharp from 'sharp';
import { Engine, type EngineOptions } from '../../src/engine/engine.js';
import { buildServer, type ServerOptions } from '../../src/entrypoints/openai/server.js';
import { registerWorkflowRoutes, type UploadLimits } from '../../src/workflows/routes.js';
import { tinyModel } from './models.js';

export interface TestServer {
  /** http://127.0.0.1:PORT */
  url: string;
  /** http://127.0.0.1:PORT/v1 */
  baseURL: string;
  client: OpenAI;
  engine: Engine;
  app: FastifyInstance;
  model: string;
  mmproj: string;
  close(): Promise<void>;
}

export interface TestServerOptions {
  /** Engine options over the defaults (KV cache 4096 tokens, 8 seqs, batch 512, 2 threads). */
  engine?: Partial<EngineOptions>;
  /** Server options over the defaults (served name "caprl"). */
  server?: Partial<Omit<ServerOptions, 'engine'>>;
  /** Leave the vision projector out. */
  textOnly?: boolean;
  /** POST /v1/captions upload limits (src/workflows/routes.ts). */
  uploadLimits?: UploadLimits;
}

export async function startTestServer(opts: TestServerOptions = {}): Promise<TestServer> {
  const tiny = await tinyModel();
  const engineOptions: EngineOptions = {
    model: tiny.model,
    mmproj: opts.textOnly ? undefined : tiny.mmproj,
    nCtx: 4096,
    maxSeqs: 8,
    nBatch: 512,
    nThreads: 2,
    logLevel: 'error',
    ...opts.engine,
  };
  const engine = new Engine(engineOptions);
  let app: FastifyInstance;
  try {
    app = buildServer({
      engine,
      servedModelNames: ['caprl'],
      modelPath: engineOptions.model,
      maxNumSeqs: engineOptions.maxSeqs,
      // As `caprl serve`: the workflows' routes on the same app (uploads limited as the test asks).
      mount: (app, ctx) => registerWorkflowRoutes(app, { ...ctx, apiKeys: opts.server?.apiKeys, uploadLimits: opts.uploadLimits }),
      ...opts.server,
    });
    await app.listen({ host: '127.0.0.1', port: 0 });
  } catch (err) {
    await engine.close();
    throw err;
  }
  const addr = app.server.address();
  if (!addr || typeof addr === 'string') throw new Error('server has no TCP address');
  const url = `http://127.0.0.1:${addr.port}`;
  const baseURL = `${url}/v1`;
  return {
    url,
    baseURL,
    client: new OpenAI({ baseURL, apiKey: 'x', maxRetries: 0, timeout: 120_000 }),
    engine,
    app,
    model: engineOptions.model,
    mmproj: engineOptions.mmproj ?? tiny.mmproj,
    async close() {
      await app.close();
      await engine.close();
    },
  };
}

/** The openai client's error for a request that must fail (fails the test if it succeeds). */
export async function apiError(p: Promise<unknown>): Promise<InstanceType<typeof OpenAI.APIError>> {
  try {
    await p;
  } catch (err) {
    if (err instanceof OpenAI.APIError) return err;
    throw err;
  }
  throw new Error('expected the request to fail');
}

/** A base64 PNG data URI of a deterministic, non-uniform test picture. */
export async function pngDataUri(width = 224, height = 224): Promise<string> {
  const raw = Buffer.alloc(width * height * 3);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = (y * width + x) * 3;
      raw[i] = (x * 255) / Math.max(1, width - 1);
      raw[i + 1] = (y * 255) / Math.max(1, height - 1);
      raw[i + 2] = ((x ^ y) & 16) ? 220 : 30;
    }
  }
  const png = await sharp(raw, { raw: { width, height, channels: 3 } }).png().toBuffer();
  return `data:image/png;base64,${png.toString('base64')}`;
}

/** Polls until `cond` holds or `ms` pass; resolves whether it held. */
export async function waitFor(cond: () => boolean, ms = 5000): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (cond()) return true;
    await new Promise((r) => setTimeout(r, 10));
  }
  return cond();
}
