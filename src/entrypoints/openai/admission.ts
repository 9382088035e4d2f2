// Back-pressure and request lifetime: how many generation requests the server holds at once,
// how long one may take, and how long a shutdown waits for them. The flags live here too (with
// --allow-private-image-urls, the switch of src/images/url-guard.ts).
//
// Admission counts requests from their arrival (before the body is read, so a refused client
// never costs a body's worth of memory) until their response ends. At most
// --max-num-seqs + --max-waiting-requests are in the server at once: the first run, the rest
// wait (in the engine's queue, or in image preparation); the next one is refused with 429,
// a Retry-After header and OpenAI's error object, at once, so clients and load balancers can
// back off or go elsewhere instead of queueing without bound.
import type { FlagSpec, ParsedValue } from '../cli-args.js';
import { CliUsageError } from '../cli-args.js';
import { ApiError } from './errors.js';

export const ADMISSION_DEFAULTS = {
  /** Generous: vLLM has no limit at all; this one only bounds memory (each waiting request holds its images). */
  maxWaitingRequests: 1024,
  /** Seconds; 0 = no limit (vLLM has none). */
  requestTimeout: 0,
  /** Seconds a shutdown lets running requests finish; inside Kubernetes' default 30 s termination grace. */
  shutdownTimeout: 25,
  /** Seconds a refused client is told to wait. */
  retryAfter: 1,
  /** --max-num-seqs default (serve.ts), when the caller does not say. */
  maxNumSeqs: 16,
} as const;

export const ADMISSION_FLAGS: FlagSpec[] = [
  {
    name: 'max-waiting-requests', type: 'int', dest: 'maxWaitingRequests',
    help: `requests that may wait beyond the --max-num-seqs running ones; more are refused with 429 and Retry-After (default: ${ADMISSION_DEFAULTS.maxWaitingRequests})`,
  },
  {
    name: 'request-timeout', type: 'float', dest: 'requestTimeout', metavar: 'SECONDS',
    help: 'cancel a request (504) that has not finished this long after it arrived; 0 = never (default: 0)',
  },
  {
    name: 'shutdown-timeout', type: 'float', dest: 'shutdownTimeout', metavar: 'SECONDS',
    help: `on SIGTERM/SIGINT, let running requests finish for this long, then cancel them and exit (default: ${ADMISSION_DEFAULTS.shutdownTimeout})`,
  },
  {
    name: 'allow-private-image-urls', type: 'bool', dest: 'allowPrivateImageUrls',
    help: 'let image URLs reach loopback, private, link-local and reserved addresses (default: only public ones; also CAPRL_ALLOW_PRIVATE_IMAGE_URLS=1)',
  },
];

export interface AdmissionConfig {
  maxWaitingRequests: number;
  /** Milliseconds; 0 = none. */
  requestTimeoutMs: number;
  /** Milliseconds. */
  shutdownTimeoutMs: number;
  /** Image URLs may reach non-public addresses (src/images/url-guard.ts). */
  allowPrivateImageUrls: boolean;
}

/**
 * The admission flags -> settings; throws CliUsageError for values a user must fix.
 * CAPRL_ALLOW_PRIVATE_IMAGE_URLS=1 in the environment does what --allow-private-image-urls does, so a
 * deployment whose images live on internal hosts can keep `vllm serve`'s command line unchanged.
 */
export function admissionConfigFromArgs(values: Record<string, ParsedValue>, env: NodeJS.ProcessEnv = process.env): AdmissionConfig {
  const num = (key: string): number | undefined => (typeof values[key] === 'number' ? (values[key] as number) : undefined);
  const maxWaitingRequests = num('maxWaitingRequests') ?? ADMISSION_DEFAULTS.maxWaitingRequests;
  if (maxWaitingRequests < 0) throw new CliUsageError(`argument --max-waiting-requests: must be non-negative, got ${maxWaitingRequests}`);
  const seconds = (key: string, flag: string, def: number): number => {
    const v = num(key) ?? def;
    if (!(v >= 0)) throw new CliUsageError(`argument --${flag}: must be a non-negative number of seconds, got ${v}`);
    return Math.round(v * 1000);
  };
  return {
    maxWaitingRequests,
    requestTimeoutMs: seconds('requestTimeout', 'request-timeout', ADMISSION_DEFAULTS.requestTimeout),
    shutdownTimeoutMs: seconds('shutdownTimeout', 'shutdown-timeout', ADMISSION_DEFAULTS.shutdownTimeout),
    allowPrivateImageUrls: values.allowPrivateImageUrls === true || env.CAPRL_ALLOW_PRIVATE_IMAGE_URLS === '1',
  };
}

/** Counts requests in the server against max running + max waiting. */
export class Admission {
  private inFlight = 0;

  constructor(
    readonly maxRunning: number = ADMISSION_DEFAULTS.maxNumSeqs,
    readonly maxWaiting: number = ADMISSION_DEFAULTS.maxWaitingRequests,
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
