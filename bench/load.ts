// A mixed-traffic load generator for an OpenAI-compatible caprl server, shared by the loopback
// load test (test/load.test.ts) and the soak run (bench/soak.ts). Closed loop: `clients` workers,
// each sending its next request when the last one ended, until a request count or a deadline.
// Each request is one of:
//   plain       non-streamed caption (image) or text completion: must come back 200 with usage
//   stream      streamed, include_usage: must end with a finish, a usage chunk and [DONE]
//   disconnect  streamed with a long forced output; the client hangs up after the first text
//               (so the server must cancel it: counted as an abort, never as a success)
//   bad         a broken request (bad JSON, bad image, unknown model): must be a 4xx error object
// and any of them may be refused with 429 (+ Retry-After) when the server is full. Everything
// else (5xx, malformed answers, network errors) is an error. Every request is accounted for.
import http from 'node:http';
import { performance } from 'node:perf_hooks';

export type RequestKind = 'plain' | 'stream' | 'disconnect' | 'bad';
export type Outcome = 'ok' | 'refused' | 'rejected' | 'disconnected' | 'error';

export interface LoadOptions {
  /** e.g. http://127.0.0.1:8000 */
  baseUrl: string;
  model: string;
  clients: number;
  /** Stop after this many requests (all kinds together)... */
  requests?: number;
  /** ...or at this deadline (ms of wall time from the start), whichever first. */
  durationMs?: number;
  /** Share of each kind (normalised); default plain 0.45, stream 0.3, disconnect 0.15, bad 0.1. */
  mix?: Partial<Record<RequestKind, number>>;
  /** data: URIs of the images captioned (cycled); none = text only. */
  images?: string[];
  /** Output tokens of plain / stream requests (forced with ignore_eos); default 8. */
  outputTokens?: number;
  /** Output tokens asked by disconnecting clients (they leave long before); default 400. */
  disconnectTokens?: number;
  /** After a 429, how long the client waits before its next request, ms (default: the Retry-After it got). */
  refusedBackoffMs?: number;
  /** Per-request client timeout, ms (default 120 s): a request past it is an error. */
  timeoutMs?: number;
  seed?: number;
  /** Called every sampleMs with the running tally (soak progress). */
  onSample?: (tally: LoadTally) => void;
  sampleMs?: number;
}

export interface LoadTally {
  sent: number;
  byKind: Record<RequestKind, number>;
  byOutcome: Record<Outcome, number>;
  /** Prompt / completion tokens of requests answered in full (usage as the server reported it). */
  promptTokens: number;
  completionTokens: number;
  /** End-to-end ms of requests answered in full. */
  latencies: number[];
  /** The first few errors, for the report. */
  errors: string[];
  elapsedMs: number;
}

/** What disconnecting clients ask (always the same, so its prompt tokens are known). */
export const DISCONNECT_PROMPT = 'Go on and on.';

const PROMPTS = ['Please describe this image in detail', 'What is in the picture?', 'Caption this.', 'List the main objects.'];

/** mulberry32: a small seeded PRNG in [0, 1), shared with the fuzz test. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = Math.imul(a ^ (a >>> 15), 1 | a);
    x = (x + Math.imul(x ^ (x >>> 7), 61 | x)) ^ x;
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}

interface Answer {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: string;
  /** The client hung up on purpose. */
  hungUp: boolean;
}

/** One POST over a fresh connection; with `hangUpAfterText`, the client closes after the first generated text. */
function post(url: URL, body: string, timeoutMs: number, hangUpAfterText: boolean): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const req = http.request(url, {
      method: 'POST',
      agent: false,
      headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
      timeout: timeoutMs,
    });
    req.on('timeout', () => req.destroy(new Error(`no answer within ${timeoutMs} ms`)));
    req.on('error', reject);
    req.on('response', (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => {
        text += d;
        if (hangUpAfterText && res.statusCode === 200 && /"content":"[^"]/.test(text)) {
          res.destroy();
          req.destroy();
          resolve({ status: 200, headers: res.headers, body: text, hungUp: true });
        }
      });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: text, hungUp: false }));
      res.on('error', reject);
    });
    req.end(body);
  });
}

function isErrorObject(body: string): boolean {
  try {
    const e = (JSON.parse(body) as { error?: Record<string, unknown> }).error;
    return !!e && typeof e.message === 'string' && typeof e.type === 'string' && 'param' in e && 'code' in e;
  } catch {
    return false;
  }
}

export async function runLoad(o: LoadOptions): Promise<LoadTally> {
  const url = new URL('/v1/chat/completions', o.baseUrl);
  const r = rng(o.seed ?? 1);
  const mix = { plain: 0.45, stream: 0.3, disconnect: 0.15, bad: 0.1, ...o.mix };
  const total = mix.plain + mix.stream + mix.disconnect + mix.bad;
  const outputTokens = o.outputTokens ?? 8;
  const timeoutMs = o.timeoutMs ?? 120_000;
  const tally: LoadTally = {
    sent: 0,
    byKind: { plain: 0, stream: 0, disconnect: 0, bad: 0 },
    byOutcome: { ok: 0, refused: 0, rejected: 0, disconnected: 0, error: 0 },
    promptTokens: 0, completionTokens: 0, latencies: [], errors: [], elapsedMs: 0,
  };
  const t0 = performance.now();
  const deadline = o.durationMs === undefined ? Infinity : t0 + o.durationMs;
  const maxRequests = o.requests ?? Infinity;
  const error = (why: string) => {
    tally.byOutcome.error++;
    if (tally.errors.length < 20) tally.errors.push(why);
  };

  const pickKind = (): RequestKind => {
    let x = r() * total;
    for (const k of ['plain', 'stream', 'disconnect', 'bad'] as const) {
      x -= mix[k];
      if (x < 0) return k;
    }
    return 'plain';
  };

  const bodyFor = (kind: RequestKind, i: number): string => {
    const image = o.images && o.images.length > 0 && r() < 0.7 ? o.images[i % o.images.length] : undefined;
    const prompt = PROMPTS[i % PROMPTS.length]!;
    const content = image ? [{ type: 'image_url', image_url: { url: image } }, { type: 'text', text: prompt }] : `${prompt} (${i})`;
    const base = { model: o.model, messages: [{ role: 'user', content }], temperature: 0, ignore_eos: true };
    switch (kind) {
      case 'plain': return JSON.stringify({ ...base, max_tokens: outputTokens });
      case 'stream': return JSON.stringify({ ...base, max_tokens: outputTokens, stream: true, stream_options: { include_usage: true } });
      case 'disconnect': return JSON.stringify({ ...base, messages: [{ role: 'user', content: DISCONNECT_PROMPT }], max_tokens: o.disconnectTokens ?? 400, stream: true });
      default: {
        const broken = [
          '{"model": "' + o.model + '", "messages": [',
          JSON.stringify({ ...base, model: 'no-such-model' }),
          JSON.stringify({ ...base, messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAA' } }] }] }),
          JSON.stringify({ ...base, max_tokens: -3 }),
        ];
        return broken[i % broken.length]!;
      }
    }
  };

  const one = async (kind: RequestKind, i: number): Promise<void> => {
    const body = bodyFor(kind, i);
    const start = performance.now();
    let a: Answer;
    try {
      a = await post(url, body, timeoutMs, kind === 'disconnect');
    } catch (err) {
      error(`${kind} #${i}: ${err instanceof Error ? err.message : String(err)}`);
      return;
    }
    if (a.status === 429) {
      const retryAfter = Number(a.headers['retry-after']);
      if (retryAfter >= 0 && isErrorObject(a.body)) tally.byOutcome.refused++;
      else error(`${kind} #${i}: 429 without Retry-After or error object`);
      // A polite client backs off before its next request.
      await new Promise((r) => setTimeout(r, o.refusedBackoffMs ?? (retryAfter >= 0 ? retryAfter * 1000 : 1000)));
      return;
    }
    if (kind === 'bad') {
      if (a.status >= 400 && a.status < 500 && isErrorObject(a.body)) tally.byOutcome.rejected++;
      else error(`bad #${i}: HTTP ${a.status} ${a.body.slice(0, 200)}`);
      return;
    }
    if (a.status !== 200) {
      error(`${kind} #${i}: HTTP ${a.status} ${a.body.slice(0, 200)}`);
      return;
    }
    if (kind === 'disconnect') {
      if (a.hungUp) tally.byOutcome.disconnected++;
      else error(`disconnect #${i}: the stream ended before any text`);
      return;
    }
    let usage: { prompt_tokens: number; completion_tokens: number } | undefined;
    if (kind === 'plain') {
      try {
        const c = JSON.parse(a.body) as { object?: string; usage?: typeof usage; choices?: { finish_reason?: string }[] };
        if (c.object === 'chat.completion' && c.choices?.[0]?.finish_reason) usage = c.usage;
      } catch {
        // usage stays undefined
      }
    } else {
      const events = a.body.split('\n\n').filter(Boolean);
      const finished = events.some((e) => e.includes('"finish_reason":"length"') || e.includes('"finish_reason":"stop"'));
      if (events[events.length - 1] === 'data: [DONE]' && finished && !events.some((e) => e.startsWith('data: {"error"'))) {
        const last = events[events.length - 2];
        try {
          usage = (JSON.parse(last!.slice(6)) as { usage?: typeof usage }).usage;
        } catch {
          // usage stays undefined
        }
      }
    }
    if (!usage || usage.completion_tokens !== outputTokens) {
      error(`${kind} #${i}: incomplete answer ${a.body.slice(0, 200)}`);
      return;
    }
    tally.byOutcome.ok++;
    tally.promptTokens += usage.prompt_tokens;
    tally.completionTokens += usage.completion_tokens;
    tally.latencies.push(performance.now() - start);
  };

  let sampler: NodeJS.Timeout | undefined;
  if (o.onSample) {
    sampler = setInterval(() => {
      tally.elapsedMs = performance.now() - t0;
      o.onSample!(tally);
    }, o.sampleMs ?? 5000);
  }
  const worker = async (): Promise<void> => {
    while (tally.sent < maxRequests && performance.now() < deadline) {
      const i = tally.sent++;
      const kind = pickKind();
      tally.byKind[kind]++;
      await one(kind, i);
    }
  };
  try {
    await Promise.all(Array.from({ length: o.clients }, worker));
  } finally {
    clearInterval(sampler);
  }
  tally.elapsedMs = performance.now() - t0;
  return tally;
}

/** Accounted requests: each sent request ended in exactly one outcome. */
export function accounted(t: LoadTally): number {
  return t.byOutcome.ok + t.byOutcome.refused + t.byOutcome.rejected + t.byOutcome.disconnected + t.byOutcome.error;
}
