// A minimal streaming OpenAI chat client for the benchmark: node:http (a fresh loopback connection
// per request: llama-server's cpp-httplib drops reused keep-alive sockets under load, and a TCP
// connect on loopback costs tens of microseconds against requests of seconds),
// the request body serialized before the clock starts, SSE parsed by hand, and every chunk
// timestamped with performance.now() as it arrives (no SDK in the measured path).
import http from 'node:http';
import { performance } from 'node:perf_hooks';
import type { RequestResult } from './stats.js';

export interface CaptionRequestOptions {
  model: string;
  prompt: string;
  /** data: URI of the image. */
  imageUrl: string;
  /** Fixed output length: max_tokens = min_tokens = this, with ignore_eos. */
  outputTokens: number;
  seed?: number;
}

/** The JSON body of one captioning request (both vLLM-style servers and llama-server accept these fields). */
export function captionBody(o: CaptionRequestOptions): string {
  return JSON.stringify({
    model: o.model,
    messages: [
      {
        role: 'user',
        content: [
          { type: 'image_url', image_url: { url: o.imageUrl } },
          { type: 'text', text: o.prompt },
        ],
      },
    ],
    max_tokens: o.outputTokens,
    min_tokens: o.outputTokens,
    ignore_eos: true,
    temperature: 0,
    seed: o.seed ?? 0,
    stream: true,
    stream_options: { include_usage: true },
  });
}

export class StreamClient {
  readonly agent: http.Agent;
  readonly url: URL;

  /** baseUrl: e.g. http://127.0.0.1:8000 (the /v1/chat/completions path is added). */
  constructor(baseUrl: string, maxSockets = 256) {
    this.url = new URL('/v1/chat/completions', baseUrl);
    this.agent = new http.Agent({ keepAlive: false, maxSockets });
  }

  close(): void {
    this.agent.destroy();
  }

  /** Sends a pre-serialized body and times the stream. Never rejects: failures come back as ok: false. */
  stream(body: string, opts: { signal?: AbortSignal; timeoutMs?: number } = {}): Promise<RequestResult> {
    const payload = Buffer.from(body);
    return new Promise((resolve) => {
      const r: RequestResult = { ok: false, start: performance.now(), end: 0, completionTokens: 0, itl: [], chunks: 0 };
      let settled = false;
      let usageTokens: number | undefined;
      let firstChoice: number | undefined;
      const finish = (error?: string) => {
        if (settled) return;
        settled = true;
        r.end = performance.now();
        if (r.firstToken === undefined && firstChoice !== undefined) r.firstToken = firstChoice;
        r.completionTokens = usageTokens ?? r.chunks;
        if (error) r.error = error;
        else if (r.completionTokens === 0) r.error = 'no tokens generated';
        r.ok = r.error === undefined;
        resolve(r);
      };
      const req = http.request(
        this.url,
        {
          method: 'POST',
          agent: this.agent,
          headers: { 'content-type': 'application/json', 'content-length': payload.length, accept: 'text/event-stream' },
          signal: opts.signal,
          timeout: opts.timeoutMs,
        },
        (res) => {
          res.setEncoding('utf8');
          if (res.statusCode !== 200) {
            let text = '';
            res.on('data', (d: string) => (text += d));
            res.on('end', () => finish(`HTTP ${res.statusCode}: ${text.slice(0, 300)}`));
            res.on('error', (e) => finish(String(e)));
            return;
          }
          let buf = '';
          let done = false;
          const onEvent = (data: string, now: number) => {
            if (data === '[DONE]') {
              done = true;
              return;
            }
            let msg: {
              choices?: { delta?: { content?: string | null; reasoning_content?: string | null } }[];
              usage?: { completion_tokens?: number; prompt_tokens?: number } | null;
              error?: unknown;
            };
            try {
              msg = JSON.parse(data);
            } catch {
              finish(`bad SSE data: ${data.slice(0, 200)}`);
              return;
            }
            if (msg.error) {
              finish(`stream error: ${JSON.stringify(msg.error).slice(0, 300)}`);
              return;
            }
            if (msg.usage && typeof msg.usage.completion_tokens === 'number') {
              usageTokens = msg.usage.completion_tokens;
              if (typeof msg.usage.prompt_tokens === 'number') r.promptTokens = msg.usage.prompt_tokens;
            }
            const delta = msg.choices?.[0]?.delta;
            if (!delta) return;
            if (firstChoice === undefined) firstChoice = now;
            const text = (delta.content ?? '') + (delta.reasoning_content ?? '');
            if (text.length === 0) return;
            if (r.lastToken !== undefined) r.itl.push(now - r.lastToken);
            if (r.firstToken === undefined) r.firstToken = now;
            r.lastToken = now;
            r.chunks++;
          };
          res.on('data', (d: string) => {
            const now = performance.now();
            buf += d;
            let i: number;
            while ((i = buf.search(/\r?\n\r?\n/)) >= 0) {
              const event = buf.slice(0, i);
              buf = buf.slice(buf[i] === '\r' ? i + 4 : i + 2);
              const data = event
                .split(/\r?\n/)
                .filter((l) => l.startsWith('data:'))
                .map((l) => l.slice(5).replace(/^ /, ''))
                .join('\n');
              if (data) onEvent(data, now);
              if (settled) return;
            }
          });
          res.on('end', () => finish(done || r.chunks > 0 ? undefined : 'stream ended without [DONE]'));
          res.on('error', (e) => finish(String(e)));
        },
      );
      req.on('timeout', () => req.destroy(new Error(`timed out after ${opts.timeoutMs} ms`)));
      req.on('error', (e) => finish(e.name === 'AbortError' ? 'aborted' : String(e.message ?? e)));
      req.end(payload);
    });
  }
}

/**
 * Runs `bodies` through the client with at most `concurrency` in flight (closed loop: a new request
 * starts as soon as one finishes). Stops issuing new requests once `deadline` (performance.now() ms)
 * passes and aborts the in-flight ones at `deadline`; `truncated` says whether that happened.
 */
export async function runLevel(
  client: StreamClient,
  bodies: readonly string[],
  concurrency: number,
  opts: { deadline?: number; timeoutMs?: number } = {},
): Promise<{ results: RequestResult[]; truncated: boolean }> {
  const results: RequestResult[] = [];
  const ac = new AbortController();
  let truncated = false;
  let timer: NodeJS.Timeout | undefined;
  if (opts.deadline !== undefined) {
    const left = opts.deadline - performance.now();
    timer = setTimeout(() => {
      truncated = true;
      ac.abort();
    }, Math.max(0, left));
  }
  let next = 0;
  const worker = async () => {
    while (next < bodies.length && !ac.signal.aborted) {
      const body = bodies[next++];
      const res = await client.stream(body, { signal: ac.signal, timeoutMs: opts.timeoutMs });
      if (!(truncated && res.error === 'aborted')) results.push(res);
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, bodies.length) }, worker));
  if (timer) clearTimeout(timer);
  return { results, truncated: truncated || results.length < bodies.length };
}
