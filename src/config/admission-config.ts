// Back-pressure and request lifetime, as flags and settings: how many generation requests the
// server holds at once, how long one may take, how long a shutdown waits for them (the runtime
// side is src/entrypoints/openai/admission.ts). --allow-private-image-urls lives here too (the
// switch of src/images/url-guard.ts).
import type { FlagSpec, ParsedValue } from './cli-args.js';
import { CliUsageError } from './cli-args.js';

export const ADMISSION_DEFAULTS = {
  /** Generous: vLLM has no limit at all; this one only bounds memory (each waiting request holds its images). */
  maxWaitingRequests: 1024,
  /** Seconds; 0 = no limit (vLLM has none). */
  requestTimeout: 0,
  /** Seconds a shutdown lets running requests finish; inside Kubernetes' default 30 s termination grace. */
  shutdownTimeout: 25,
  /** Seconds a refused client is told to wait. */
  retryAfter: 1,
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
