// The endpoints vLLM's OpenAI server has besides chat and models: POST /v1/completions,
// POST /tokenize, POST /detokenize, GET /version. (/health and /ping live in server.ts.)
import { readFileSync } from 'node:fs';
import type { FastifyInstance } from 'fastify';
import type { ServingContext } from '../../serving/context.js';
import { createCompletionsHandler } from './completions.js';
import { createDetokenizeHandler, createTokenizeHandler, TokenText } from './tokenize.js';

let cachedVersion: string | undefined;

/** This package's version (package.json), what /version reports. */
export function serverVersion(): string {
  if (cachedVersion === undefined) {
    cachedVersion = '0.0.0';
    // dist/src/entrypoints/openai/ -> the package root; src/... when run from source.
    for (const rel of ['../../../../package.json', '../../../package.json']) {
      try {
        const pkg = JSON.parse(readFileSync(new URL(rel, import.meta.url), 'utf8')) as { name?: string; version?: string };
        if (pkg.name === 'caprl-serve' && typeof pkg.version === 'string') {
          cachedVersion = pkg.version;
          break;
        }
      } catch {
        // try the next
      }
    }
  }
  return cachedVersion;
}

export function registerVllmRoutes(app: FastifyInstance, opts: ServingContext): void {
  const tokenText = new TokenText(opts.engine);

  app.post('/v1/completions', createCompletionsHandler({
    engine: opts.engine,
    servedModelNames: opts.servedModelNames,
    tokenText,
    maxLogprobs: opts.maxLogprobs,
    maxNumSeqs: opts.maxNumSeqs,
    seed: opts.seed,
    logRequests: opts.logRequests,
    isAccepting: opts.isAccepting,
  }));

  app.post('/tokenize', createTokenizeHandler({
    engine: opts.engine,
    servedModelNames: opts.servedModelNames,
    imageOptions: opts.imageOptions,
    imageSource: opts.imageSource,
    limitImagesPerPrompt: opts.limitImagesPerPrompt,
    tokenText,
  }));
  app.post('/detokenize', createDetokenizeHandler({ engine: opts.engine, servedModelNames: opts.servedModelNames, tokenText }));

  app.get('/version', async () => ({ version: serverVersion() }));
}
