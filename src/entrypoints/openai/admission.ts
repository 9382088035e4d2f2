// Back-pressure and request lifetime: how many generation requests the server holds at once,
// how long one may take, and how long a shutdown waits for them (the flags and their defaults:
// src/config/admission-config.ts).
//
// Admission counts requests from their arrival (before the body is read, so a refused client
// never costs a body's worth of memory) until their response ends. At most
// --max-num-seqs + --max-waiting-requests are in the server at once: the first run, the rest
// wait (in the engine's queue, or in image preparation); the next one is refused with 429,
// a Retry-After header and OpenAI's error object, at once, so clients and load balancers can
// back off or go elsewhere instead of queueing without bound.
import { ApiError } from '../../serving/errors.js';

/** Counts requests in the server against max running + max waiting. */
export class Admission {
  private inFlight = 0;

  constructor(
    readonly maxRunning: number,
    readonly maxWaiting: number,
  ) {}

  get capacity(): number {
    return this.maxRunning + this.maxWaiting;
  }

  get count(): number {
    return this.inFlight;
  }

  /** Takes a place; false when the server is full. */
  tryAcquire(): boolean {
    if (this.inFlight >= this.capacity) return false;
    this.inFlight++;
    return true;
  }

  release(): void {
    if (this.inFlight > 0) this.inFlight--;
  }
}

export function queueFullError(a: Admission, retryAfterSeconds: number): ApiError {
  return new ApiError(
    429,
    `The server is at capacity: ${a.count} requests are in progress (${a.maxRunning} running + ${a.maxWaiting} waiting, ` +
    `--max-num-seqs + --max-waiting-requests). Retry after ${retryAfterSeconds} s.`,
    'rate_limit_error',
    null,
    'queue_full',
  );
}

export function timeoutError(timeoutMs: number): ApiError {
  return new ApiError(
    504,
    `The request did not finish within ${timeoutMs / 1000} s (--request-timeout) and was cancelled; ` +
    'ask for fewer tokens (max_tokens), or retry when the server is less busy.',
    'timeout_error',
    null,
    'request_timeout',
  );
}

export function shuttingDownError(): ApiError {
  return new ApiError(503, 'The server is shutting down and takes no new requests', 'service_unavailable', null, 'service_unavailable');
}
