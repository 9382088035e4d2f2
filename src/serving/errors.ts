// OpenAI's error object, {error: {message, type, param, code}}, and the HTTP status for each.
// 400 invalid_request_error (param names the offending field), 404 for an unknown model (vLLM
// answers 404 NotFoundError with "The model `x` does not exist."), 413 for an oversized body,
// 500 internal errors, 503 while the engine is gone.
import type { ErrorResponse } from './protocol.js';

export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly type: string,
    readonly param: string | null = null,
    readonly code: string | null = null,
  ) {
    super(message);
    this.name = 'ApiError';
  }

  toJSON(): ErrorResponse {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }
}

export function badRequest(message: string, param: string | null = null, code: string | null = null): ApiError {
  return new ApiError(400, message, 'invalid_request_error', param, code);
}

export function modelNotFound(model: string): ApiError {
  return new ApiError(404, `The model \`${model}\` does not exist.`, 'NotFoundError', 'model', 'model_not_found');
}

export function notFound(message: string): ApiError {
  return new ApiError(404, message, 'NotFoundError', null, 'not_found');
}

export function internalError(message: string): ApiError {
  return new ApiError(500, message, 'internal_server_error', null, 'internal_error');
}

export function serviceUnavailable(message: string): ApiError {
  return new ApiError(503, message, 'service_unavailable', null, 'service_unavailable');
}

interface FastifyLikeError {
  code?: string;
  statusCode?: number;
  message?: string;
  validation?: unknown;
}

/** Maps anything thrown while handling a request to an ApiError (Fastify's own errors included). */
export function toApiError(err: unknown): ApiError {
  if (err instanceof ApiError) return err;
  const e = (err ?? {}) as FastifyLikeError;
  switch (e.code) {
    case 'FST_ERR_CTP_BODY_TOO_LARGE':
      return new ApiError(413, 'Request body is too large', 'invalid_request_error', null, 'request_too_large');
    case 'FST_ERR_CTP_INVALID_JSON_BODY':
      return badRequest('Request body is not valid JSON', null, 'invalid_json');
    case 'FST_ERR_CTP_EMPTY_JSON_BODY':
      return badRequest('Request body is empty; expected a JSON object');
    case 'FST_ERR_CTP_INVALID_MEDIA_TYPE':
      return new ApiError(415, 'Unsupported Content-Type; send application/json', 'invalid_request_error', null, 'unsupported_media_type');
    case 'FST_ERR_CTP_INVALID_CONTENT_LENGTH':
      return badRequest('Request body size did not match Content-Length');
    default:
      break;
  }
  // JSON.parse errors from Fastify's body parser arrive as SyntaxError with statusCode 400.
  if (err instanceof SyntaxError || (e.statusCode === 400 && /JSON/i.test(e.message ?? ''))) {
    return badRequest(`Request body is not valid JSON: ${e.message ?? 'parse error'}`, null, 'invalid_json');
  }
  if (typeof e.statusCode === 'number' && e.statusCode >= 400 && e.statusCode < 500) {
    return new ApiError(e.statusCode, e.message ?? 'Bad request', 'invalid_request_error');
  }
  const message = err instanceof Error ? err.message : String(err);
  return internalError(`Internal server error: ${message}`);
}
