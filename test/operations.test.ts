// Back-pressure and request lifetime on the real server (tiny model): the bounded queue (429 +
// Retry-After), --request-timeout (504), clients that leave while waiting or while their images
// are prepared, graceful shutdown (finish within the grace period, or cancel after it), and one
// log line per request with its id and without bodies.
import t from 'tap';
import { Writable } from 'node:stream';
import sharp from 'sharp';
import { ADMISSION_FLAGS, admissionConfigFromArgs } from '../src/config/admission-config.js';
import { Admission } from '../src/entrypoints/openai/admission.js';
import { requestId } from '../src/entrypoints/openai/operations.js';
import { SERVE_SPEC } from '../src/config/serve-config.js';
import { GracefulShutdown } from '../src/entrypoints/openai/shutdown.js';
import { CliUsageError } from '../src/config/cli-args.js';
import { scrape } from './helpers/prom.js';
import { pngDataUri, startTestServer, waitFor, type TestServer } from './helpers/server.js';

const L = { model_name: 'caprl', engine: '0' };

function post(s: TestServer, body: unknown, init: RequestInit = {}): Promise<Response> {
  return fetch(`${s.baseURL}/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...(init.headers as Record<string, string> | undefined) },
    body: JSON.stringify(body),
    signal: init.signal,
  });
}

const long = (tokens: number, extra: Record<string, unknown> = {}) => ({
  model: 'caprl', messages: [{ role: 'user', content: 'Go on and on.' }], max_tokens: tokens, ignore_eos: true, temperature: 0, ...extra,
});

/** The first decodes of a fresh engine are slow: get them out of the way (whatever the answer). */
async function warm(s: TestServer): Promise<void> {
  for (let i = 0; i < 2; i++) await (await post(s, long(4))).arrayBuffer();
}

/** Reads an SSE body to its end; returns the parsed data payloads ([DONE] as the string). */
async function sse(res: Response): Promise<unknown[]> {
  const text = await res.text();
  return text.split('\n\n').filter(Boolean).map((e) => (e === 'data: [DONE]' ? '[DONE]' : JSON.parse(e.slice(6))));
}

t.test('admission flags and counting', async (t) => {
  t.same(admissionConfigFromArgs({}), { maxWaitingRequests: 1024, requestTimeoutMs: 0, shutdownTimeoutMs: 25_000, allowPrivateImageUrls: false });
  t.same(admissionConfigFromArgs({ maxWaitingRequests: 0, requestTimeout: 1.5, shutdownTimeout: 0, allowPrivateImageUrls: true }), {
    maxWaitingRequests: 0, requestTimeoutMs: 1500, shutdownTimeoutMs: 0, allowPrivateImageUrls: true,
  });
  t.throws(() => admissionConfigFromArgs({ maxWaitingRequests: -1 }), CliUsageError);
  t.throws(() => admissionConfigFromArgs({ requestTimeout: -2 }), /--request-timeout/);
  for (const f of ADMISSION_FLAGS) t.ok(SERVE_SPEC.flags.some((g) => g.name === f.name), `caprl serve takes --${f.name}`);
  const a = new Admission(2, 1);
  t.equal(a.capacity, 3);
  t.ok(a.tryAcquire() && a.tryAcquire() && a.tryAcquire());
  t.notOk(a.tryAcquire(), 'full');
  a.release();
  t.ok(a.tryAcquire());
  for (let i = 0; i < 5; i++) a.release();
  t.equal(a.count, 0, 'never below zero');
});

t.test('request ids: X-Request-Id kept when well-formed, else a UUID', async (t) => {
  const req = (h?: string) => ({ headers: h === undefined ? {} : { 'x-request-id': h } }) as never;
  t.equal(requestId(req('abc-123')), 'abc-123');
  t.match(requestId(req()), /^[0-9a-f-]{36}$/);
  t.match(requestId(req('has space')), /^[0-9a-f-]{36}$/);
  t.match(requestId(req('x'.repeat(200))), /^[0-9a-f-]{36}$/);
  t.match(requestId(req('a\nb')), /^[0-9a-f-]{36}$/);
});

t.test('a full server refuses with 429, Retry-After and an OpenAI error, and recovers', async (t) => {
  const s = await startTestServer({
    engine: { nThreads: 1, maxModelLen: 1024, maxSeqs: 1 },
    server: { operations: { maxNumSeqs: 1, maxWaitingRequests: 1, retryAfterSeconds: 2 } },
  });
  t.teardown(() => s.close());
  await warm(s);
  const rs = await Promise.all(Array.from({ length: 5 }, () => post(s, long(400))));
  const statuses = rs.map((r) => r.status).sort();
  t.same(statuses, [200, 200, 429, 429, 429], 'max-num-seqs 1 + max-waiting-requests 1 = 2 in the server');
  for (const r of rs.filter((x) => x.status === 429)) {
    t.equal(r.headers.get('retry-after'), '2');
    const body = await r.json() as { error: { type: string; code: string; message: string; param: unknown } };
    t.match(body, { error: { type: 'rate_limit_error', code: 'queue_full', param: null } });
    t.match(body.error.message, /at capacity.*Retry after 2 s/);
  }
  for (const r of rs.filter((x) => x.status === 200)) t.equal(((await r.json()) as { usage: { completion_tokens: number } }).usage.completion_tokens, 400);
  // Places are given back: the next ones get in.
  const again = await Promise.all([post(s, long(4)), post(s, long(4))]);
  t.same(again.map((r) => r.status), [200, 200]);
  await Promise.all(again.map((r) => r.arrayBuffer()));
  const m = await scrape(s.url);
  t.equal(m.value('caprl:requests_rejected_total', { ...L, reason: 'queue_full' }), 3);
  t.equal(m.value('http_requests_total', { status: '4xx' }), 3);
  t.equal(m.value('caprl:num_requests_preprocessing', L), 0);
});

t.test('clients that leave while waiting or during image preparation free their place at once', async (t) => {
  const s = await startTestServer({
    engine: { nThreads: 1, maxModelLen: 4000, maxSeqs: 1 },
    server: { operations: { maxNumSeqs: 1, maxWaitingRequests: 1 } },
  });
  t.teardown(() => s.close());
  await warm(s);
  // A runs; B waits in the engine's queue; B's client leaves.
  const acA = new AbortController();
  const a = await post(s, long(3900, { stream: true }), { signal: acA.signal });
  const readerA = a.body!.getReader();
  await readerA.read();
  const acB = new AbortController();
  const b = post(s, long(50), { signal: acB.signal }).catch((e: unknown) => e);
  t.ok(await waitFor(() => s.engine.stats().waiting === 1, 5000), 'B is waiting in the engine');
  acB.abort();
  await b;
  t.ok(await waitFor(() => s.engine.liveCount === 1 && s.engine.stats().waiting === 0, 5000), 'B is gone, A still runs');
  // The place B held is free again: one more may wait.
  const c = post(s, long(2));
  acA.abort();
  t.equal((await c).status, 200, 'C got in after B left');
  t.ok(await waitFor(() => s.engine.liveCount === 0 && s.engine.stats().kvUsedCells === 0, 5000), 'everything freed');

  // A client that leaves while its (large) image is being prepared: nothing reaches the engine.
  const big = await sharp({ create: { width: 2000, height: 2000, channels: 3, background: '#808080', noise: { type: 'gaussian', mean: 128, sigma: 40 } } })
    .png({ compressionLevel: 1 }).toBuffer();
  const steps = s.engine.stats().steps;
  const acD = new AbortController();
  const d = post(s, {
    model: 'caprl', max_tokens: 5,
    messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: `data:image/png;base64,${big.toString('base64')}` } }, { type: 'text', text: 'x' }] }],
  }, { signal: acD.signal }).catch((e: unknown) => e);
  await waitFor(() => false, 150);
  acD.abort();
  await d;
  const m = await (async () => {
    for (let i = 0; i < 100; i++) {
      const sc = await scrape(s.url);
      if (sc.value('caprl:num_requests_preprocessing', L) === 0) return sc;
      await new Promise((r) => setTimeout(r, 50));
    }
    return scrape(s.url);
  })();
  t.equal(m.value('caprl:num_requests_preprocessing', L), 0, 'its place was given back');
  await waitFor(() => false, 200);
  t.equal(s.engine.liveCount, 0);
  t.ok(s.engine.stats().steps - steps <= 1, 'the engine did not generate for it');
  const e = await Promise.all([post(s, long(2)), post(s, long(2))]);
  t.same(e.map((r) => r.status), [200, 200], 'both places free');
});

t.test('--request-timeout: 504 for a plain request, an error event for a stream, KV cells freed', async (t) => {
  const s = await startTestServer({ engine: { nThreads: 1, maxModelLen: 4000 }, server: { operations: { requestTimeoutMs: 300 } } });
  t.teardown(() => s.close());
  await warm(s);
  const before = await scrape(s.url);
  const t0 = performance.now();
  const r = await post(s, long(3900));
  t.equal(r.status, 504);
  const body = await r.json() as { error: { message: string } };
  t.match(body, { error: { type: 'timeout_error', code: 'request_timeout', param: null } });
  t.match(body.error.message, /did not finish within 0\.3 s \(--request-timeout\)/);
  t.ok(performance.now() - t0 < 5000, 'answered soon after the timeout');

  const st = await post(s, long(3900, { stream: true }));
  t.equal(st.status, 200);
  const events = await sse(st);
  t.equal(events[events.length - 1], '[DONE]');
  t.match(events[events.length - 2], { error: { code: 'request_timeout' } }, 'the stream ends with the timeout error');
  t.ok(await waitFor(() => s.engine.liveCount === 0 && s.engine.stats().kvUsedCells === 0, 5000), 'generation cancelled, KV freed');

  // A short request is not affected.
  const ok = await post(s, long(3));
  t.equal(ok.status, 200);
  const m = await scrape(s.url);
  const d = (name: string, labels: Record<string, string>) => m.value(name, labels) - before.value(name, labels);
  t.equal(d('caprl:request_timeouts_total', L), 2);
  t.equal(d('vllm:request_success_total', { ...L, finished_reason: 'abort' }), 2);
});

t.test('graceful shutdown: running requests finish, new connections are refused', async (t) => {
  const s = await startTestServer({ engine: { nThreads: 1, maxModelLen: 1024 } });
  await warm(s);
  const res = await post(s, long(600, { stream: true }));
  const done = sse(res);
  await waitFor(() => s.engine.liveCount === 1, 5000);
  const shutdown = new GracefulShutdown(s.app, s.engine, { graceMs: 60_000 });
  const closing = shutdown.run();
  await waitFor(() => false, 50);
  const refused = await fetch(`${s.url}/health`).then((r) => r.status, (e: Error) => (e.cause as { code?: string })?.code ?? e.message);
  t.equal(refused, 'ECONNREFUSED', 'no new connections while draining');
  const events = await done;
  t.equal(events[events.length - 1], '[DONE]');
  const finish = events.find((e) => (e as { choices?: { finish_reason?: string }[] }).choices?.[0]?.finish_reason);
  t.match(finish, { choices: [{ finish_reason: 'length' }] }, 'the running stream finished normally');
  t.same(await closing, { cancelled: 0, closeFailed: false });
  t.equal(s.engine.liveCount, 0);
});

t.test('graceful shutdown: past the grace period, running requests are cancelled and answered', async (t) => {
  const s = await startTestServer({ engine: { nThreads: 1, maxModelLen: 2100 } });
  await warm(s);
  const plain = post(s, long(2000));
  const stream = post(s, long(2000, { stream: true })).then(sse);
  await waitFor(() => s.engine.liveCount === 2 && s.engine.stats().running === 2, 5000);
  const t0 = performance.now();
  const result = await new GracefulShutdown(s.app, s.engine, { graceMs: 200 }).run();
  t.ok(performance.now() - t0 < 5000, 'done soon after the grace period');
  t.equal(result.cancelled, 2);
  const p = await plain;
  t.equal(p.status, 503);
  t.match(await p.json(), { error: { message: /aborted by the server/ } });
  const events = await stream;
  t.equal(events[events.length - 1], '[DONE]');
  t.match(events[events.length - 2], { error: { message: /aborted by the server/ } });
  t.equal(s.engine.liveCount, 0);
});

t.test('one log line per request, with its id, never bodies or image bytes', async (t) => {
  const lines: Record<string, unknown>[] = [];
  const stream = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const l of chunk.toString().split('\n')) if (l.trim()) lines.push(JSON.parse(l) as Record<string, unknown>);
      cb();
    },
  });
  const s = await startTestServer({ engine: { nThreads: 1 }, server: { logger: { level: 'info', stream } } });
  t.teardown(() => s.close());
  const image = await pngDataUri(64, 64);
  const imageBytes = image.slice(40, 100);
  const secret = 'SECRET-PROMPT-7f3a';
  const ok = await post(s, {
    model: 'caprl', max_tokens: 3,
    messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: image } }, { type: 'text', text: secret }] }],
  }, { headers: { 'x-request-id': 'client-req-42' } });
  t.equal(ok.status, 200);
  t.equal(ok.headers.get('x-request-id'), 'client-req-42', 'the id is echoed');
  await ok.arrayBuffer();
  const bad = await fetch(`${s.baseURL}/chat/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: `{"messages": "SECRET-BODY-9c1", ` });
  t.equal(bad.status, 400);
  const badId = bad.headers.get('x-request-id');
  t.match(badId, /^[0-9a-f-]{36}$/);
  const notFound = await fetch(`${s.url}/nope?token=SECRET-QUERY`);
  t.equal(notFound.status, 404);
  const invalid = await post(s, { model: 'caprl', messages: [{ role: 'user', content: 'x' }], temperature: 'SECRET-FIELD' });
  t.equal(invalid.status, 400);
  await waitFor(() => lines.filter((l) => l.msg === 'request').length >= 4, 2000);

  const reqLines = lines.filter((l) => l.msg === 'request');
  t.equal(reqLines.length, 4, 'one line per request');
  const byId = new Map(reqLines.map((l) => [l.reqId, l]));
  t.equal(byId.size, 4, 'each with its own request id');
  t.match(byId.get('client-req-42'), { method: 'POST', url: '/v1/chat/completions', status: 200, images: 1, finish: 'length', completionTokens: 3 });
  t.match(byId.get(badId), { status: 400 });
  t.ok(reqLines.some((l) => l.url === '/nope' && l.status === 404), 'path without the query string');
  const all = lines.map((l) => JSON.stringify(l)).join('\n');
  for (const s of [secret, 'SECRET-BODY', 'SECRET-QUERY', 'SECRET-FIELD', imageBytes]) t.notOk(all.includes(s), `logs do not contain ${s.slice(0, 20)}`);
});
