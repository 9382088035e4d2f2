// Running OpenAI-compatible servers (caprl serve, vLLM, ...) used as a pool: each chat request
// goes to the server with the fewest requests in flight (ties: round robin). A 4xx answer is
// the request's own fault and becomes a RecordError; connection failures, timeouts and 5xx are
// retried with backoff (on another server when there is one), and when the retries run out the
// run stops (EndpointError): a rerun resumes where it stopped.
import { RecordError, errorMessage } from './errors.js';

export class EndpointError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'EndpointError';
  }
}

export interface EndpointPoolOptions {
  apiKey?: string;
  /** Per-request timeout (default 600 s). */
  timeoutMs?: number;
  /** Attempts after the first one for retryable failures (default 4). */
  retries?: number;
  /** First backoff delay; doubles each attempt (default 500 ms). */
  backoffMs?: number;
}

/** "http://h:8000", "http://h:8000/v1" or the full ".../v1/chat/completions" -> the chat completions URL. */
export function chatCompletionsUrl(base: string): string {
  let u = base.trim().replace(/\/+$/, '');
  if (!/^https?:\/\//i.test(u)) u = `http://${u}`;
  if (/\/chat\/completions$/.test(u)) return u;
  if (/\/v1$/.test(u)) return `${u}/chat/completions`;
  return `${u}/v1/chat/completions`;
}

interface Endpoint {
  url: string;
  inFlight: number;
  completed: number;
}

export interface ChatResponseJson {
  model?: string;
  choices?: { index?: number; message?: { content?: string | null }; finish_reason?: string | null }[];
  usage?: { prompt_tokens?: number; completion_tokens?: number };
}

export class EndpointPool {
  private readonly endpoints: Endpoint[];
  private rr = 0;

  constructor(urls: readonly string[], private readonly opts: EndpointPoolOptions = {}) {
    if (urls.length === 0) throw new Error('at least one endpoint is required');
    this.endpoints = urls.map((u) => ({ url: chatCompletionsUrl(u), inFlight: 0, completed: 0 }));
  }

  /** Requests answered by each endpoint so far. */
  get stats(): { url: string; completed: number }[] {
    return this.endpoints.map((e) => ({ url: e.url, completed: e.completed }));
  }

  get size(): number {
    return this.endpoints.length;
  }

  private pick(exclude?: Endpoint): Endpoint {
    let best: Endpoint | undefined;
    const n = this.endpoints.length;
    for (let k = 0; k < n; k++) {
      const e = this.endpoints[(this.rr + k) % n]!;
      if (e === exclude && n > 1) continue;
      if (!best || e.inFlight < best.inFlight) best = e;
    }
    this.rr = (this.rr + 1) % n;
    return best!;
  }

  /** POSTs a chat completion request body; resolves with the parsed 200 response. */
  async chat(body: Record<string, unknown>, signal?: AbortSignal): Promise<ChatResponseJson> {
    const retries = this.opts.retries ?? 4;
    let last: Endpoint | undefined;
    let lastErr = '';
    for (let attempt = 0; attempt <= retries; attempt++) {
      if (attempt > 0) {
        await sleep((this.opts.backoffMs ?? 500) * 2 ** (attempt - 1), signal);
      }
      const ep = this.pick(last);
      last = ep;
      ep.inFlight++;
      try {
        const signals = [AbortSignal.timeout(this.opts.timeoutMs ?? 600_000)];
        if (signal) signals.push(signal);
        const res = await fetch(ep.url, {
          method: 'POST',
          headers: {
            'content-type': 'application/json',
            ...(this.opts.apiKey ? { authorization: `Bearer ${this.opts.apiKey}` } : {}),
          },
          body: JSON.stringify(body),
          signal: AbortSignal.any(signals),
        });
        const text = await res.text();
        if (res.ok) {
          ep.completed++;
          try {
            return JSON.parse(text) as ChatResponseJson;
          } catch {
            lastErr = `${ep.url}: the response is not JSON`;
            continue;
          }
        }
        const detail = apiErrorMessage(text) ?? `HTTP ${res.status}`;
        if (res.status >= 400 && res.status < 500 && res.status !== 408 && res.status !== 429) {
          throw new RecordError(`the server refused the request (HTTP ${res.status}): ${detail}`, apiErrorCode(text));
        }
        lastErr = `${ep.url}: HTTP ${res.status}: ${detail}`;
      } catch (err) {
        if (err instanceof RecordError) throw err;
        if (signal?.aborted) throw err;
        lastErr = `${ep.url}: ${errorMessage(err)}${(err as { cause?: unknown }).cause ? ` (${errorMessage((err as { cause?: unknown }).cause)})` : ''}`;
      } finally {
        ep.inFlight--;
      }
    }
    throw new EndpointError(`no server answered after ${retries + 1} attempts; last error: ${lastErr}`);
  }
}

function apiErrorMessage(text: string): string | undefined {
  try {
    const v = JSON.parse(text) as { error?: { message?: unknown } | string; message?: unknown };
    if (typeof v.error === 'string') return v.error;
    if (v.error && typeof v.error.message === 'string') return v.error.message;
    if (typeof v.message === 'string') return v.message;
  } catch {
    // not JSON
  }
  return text.length > 0 ? text.slice(0, 300) : undefined;
}

function apiErrorCode(text: string): string | null {
  try {
    const v = JSON.parse(text) as { error?: { code?: unknown } };
    const c = v.error?.code;
    return typeof c === 'string' ? c : typeof c === 'number' ? String(c) : null;
  } catch {
    return null;
  }
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const t = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = (): void => {
      clearTimeout(t);
      reject(signal!.reason);
    };
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}
