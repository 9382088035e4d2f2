// --api-key / VLLM_API_KEY, as vLLM's AuthenticationMiddleware: every request whose path starts
// with /v1 needs `Authorization: Bearer <one of the keys>`; OPTIONS (CORS preflight) and the
// paths outside /v1 (/health, /ping, /version, /tokenize, /detokenize, /metrics) stay open.
// Keys are compared as SHA-256 digests in constant time. The 401 is OpenAI's error object and
// never echoes what the client sent.
import { createHash, timingSafeEqual } from 'node:crypto';
import type { FastifyInstance } from 'fastify';
import { ApiError } from './errors.js';

function digest(s: string): Buffer {
  return createHash('sha256').update(s, 'utf8').digest();
}

export function unauthorized(): ApiError {
  return new ApiError(
    401,
    'Incorrect API key provided. Send it as `Authorization: Bearer <key>` (the key given to --api-key or VLLM_API_KEY).',
    'invalid_request_error',
    null,
    'invalid_api_key',
  );
}

/** Whether `authorization` (the header value) carries one of `keys`. */
export function checkBearer(authorization: string | undefined, keyDigests: readonly Buffer[]): boolean {
  const header = authorization ?? '';
  const sp = header.indexOf(' ');
  const scheme = sp < 0 ? header : header.slice(0, sp);
  const token = sp < 0 ? '' : header.slice(sp + 1);
  if (scheme.toLowerCase() !== 'bearer') return false;
  const d = digest(token);
  let ok = false;
  for (const k of keyDigests) ok = timingSafeEqual(d, k) || ok; // no early exit
  return ok;
}

/** Installs the check on `app` when `keys` is not empty. */
export function installApiKeyAuth(app: FastifyInstance, keys: readonly string[]): void {
  const digests = keys.filter((k) => k !== '').map(digest);
  if (digests.length === 0) return;
  app.addHook('onRequest', async (request, reply) => {
    if (request.method === 'OPTIONS') return;
    const path = request.url.split('?')[0]!;
    if (!path.startsWith('/v1')) return;
    if (checkBearer(request.headers.authorization, digests)) return;
    const e = unauthorized();
    await reply.code(401).header('www-authenticate', 'Bearer').type('application/json').send(e.toJSON());
  });
}
