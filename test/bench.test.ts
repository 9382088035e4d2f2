// bench/: statistics helpers, the streaming client's timing and SSE parsing against a fake
// OpenAI server on loopback, the closed-loop concurrency, and a whole `--endpoint` run.
import t from 'tap';
import http from 'node:http';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { captionBody, runLevel, StreamClient } from '../bench/client.js';
import { markdownReport, type BenchReport } from '../bench/report.js';
import { main as benchMain } from '../bench/run.js';
import { mean, percentile, summarize, type RequestResult } from '../bench/stats.js';

t.test('percentile: numpy linear interpolation', async (t) => {
  t.equal(percentile([1, 2, 3, 4], 50), 2.5);
  t.ok(Math.abs(percentile([1, 2, 3, 4], 99) - 3.97) < 1e-12, 'np.percentile([1,2,3,4], 99) = 3.97');
  t.equal(percentile([4, 1, 3, 2], 0), 1, 'unsorted input, min');
  t.equal(percentile([4, 1, 3, 2], 100), 4, 'max');
  t.equal(percentile([7], 99), 7);
  t.ok(Number.isNaN(percentile([], 50)), 'no data: NaN');
  t.ok(Math.abs(percentile([10, 20, 30, 40, 50, 60, 70, 80, 90, 100], 90) - 91) < 1e-12, 'np.percentile(10..100, 90) = 91');
  t.throws(() => percentile([1], 101));
  t.equal(mean([1, 2, 3, 6]), 3);
  const xs = [3, 1, 2];
  percentile(xs, 50);
  t.same(xs, [3, 1, 2], 'input not sorted in place');
});

t.test('summarize: throughput, TTFT, TPOT', async (t) => {
  const mk = (start: number, first: number, last: number, end: number, tokens: number): RequestResult =>
    ({ ok: true, start, firstToken: first, lastToken: last, end, completionTokens: tokens, itl: [10, 20], chunks: tokens });
  const rs = [mk(0, 100, 1100, 1100, 11), mk(0, 300, 2300, 2000, 11), { ok: false, error: 'HTTP 500: x', start: 0, end: 50, completionTokens: 0, itl: [], chunks: 0 }];
  const s = summarize(8, rs);
  t.equal(s.requests, 3);
  t.equal(s.completed, 2);
  t.equal(s.failed, 1);
  t.same(s.errors, ['HTTP 500: x']);
  t.equal(s.durationS, 2);
  t.equal(s.captionsPerS, 1);
  t.equal(s.outputTokensPerS, 11);
  t.equal(s.ttftMs.p50, 200);
  t.equal(s.tpotMs.p50, 150, 'TPOT (last-first)/(n-1): 100 and 200 ms');
  t.equal(s.itlMs.mean, 15);
  t.equal(s.meanOutputTokens, 11);
});

interface FakeOptions {
  /** ms before each content chunk */
  gap?: number;
  status?: number;
  /** split every event across two writes */
  split?: boolean;
  usage?: boolean;
}

/** A fake streaming chat server; records the bodies and the peak number of requests in flight. */
async function fakeServer(o: FakeOptions = {}) {
  const bodies: Record<string, unknown>[] = [];
  let inFlight = 0, peak = 0;
  const server = http.createServer((req, res) => {
    let raw = '';
    req.on('data', (d) => (raw += d));
    req.on('end', async () => {
      if (req.url === '/health') return res.end('ok');
      if (req.method !== 'POST') {
        // No /metrics here (as llama-server without --metrics): the bench reports no breakdown.
        res.writeHead(404);
        return res.end();
      }
      const body = JSON.parse(raw);
      bodies.push(body);
      if (o.status && o.status !== 200) {
        res.writeHead(o.status, { 'content-type': 'application/json' });
        return res.end(JSON.stringify({ error: { message: 'boom' } }));
      }
      inFlight++;
      peak = Math.max(peak, inFlight);
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      const send = (obj: unknown) => {
        const ev = `data: ${typeof obj === 'string' ? obj : JSON.stringify(obj)}\n\n`;
        if (o.split) {
          res.write(ev.slice(0, 7));
          res.write(ev.slice(7));
        } else res.write(ev);
      };
      send({ choices: [{ index: 0, delta: { role: 'assistant', content: null } }] });
      for (let i = 0; i < body.max_tokens; i++) {
        await new Promise((r) => setTimeout(r, o.gap ?? 5));
        send({ choices: [{ index: 0, delta: { content: `w${i} ` } }] });
      }
      send({ choices: [{ index: 0, delta: {}, finish_reason: 'length' }] });
      if (o.usage !== false) send({ choices: [], usage: { prompt_tokens: 300, completion_tokens: body.max_tokens } });
      send('[DONE]');
      inFlight--;
      res.end();
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return { url, bodies, peak: () => peak, close: () => new Promise<void>((r) => server.close(() => r())) };
}

const body = (n: number) => captionBody({ model: 'caprl', prompt: 'Describe', imageUrl: 'data:image/jpeg;base64,AAAA', outputTokens: n });

t.test('client: request fields, TTFT and token timing from the stream', async (t) => {
  for (const split of [false, true]) {
    const srv = await fakeServer({ gap: 30, split });
    const client = new StreamClient(srv.url);
    const r = await client.stream(body(6));
    client.close();
    await srv.close();
    t.ok(r.ok, `ok (split=${split})`);
    t.equal(r.completionTokens, 6, 'usage.completion_tokens');
    t.equal(r.promptTokens, 300);
    t.equal(r.chunks, 6);
    t.equal(r.itl.length, 5);
    t.ok(r.firstToken! - r.start >= 25, `TTFT waits for the first content, not the role chunk (${(r.firstToken! - r.start).toFixed(1)} ms)`);
    const tpot = (r.lastToken! - r.firstToken!) / 5;
    t.ok(tpot >= 25 && tpot < 200, `TPOT ~30 ms (${tpot.toFixed(1)})`);
    const b = srv.bodies[0] as { max_tokens: number; min_tokens: number; ignore_eos: boolean; stream: boolean; messages: { content: { type: string }[] }[] };
    t.same([b.max_tokens, b.min_tokens, b.ignore_eos, b.stream], [6, 6, true, true]);
    t.same(b.messages[0].content.map((c) => c.type), ['image_url', 'text']);
  }
  const noUsage = await fakeServer({ usage: false });
  const c2 = new StreamClient(noUsage.url);
  const r2 = await c2.stream(body(4));
  c2.close();
  await noUsage.close();
  t.equal(r2.completionTokens, 4, 'without usage: counts content chunks');
});

t.test('client: errors are results, not exceptions', async (t) => {
  const srv = await fakeServer({ status: 500 });
  const client = new StreamClient(srv.url);
  const r = await client.stream(body(3));
  t.notOk(r.ok);
  t.match(r.error, /HTTP 500/);
  client.close();
  await srv.close();
  const dead = new StreamClient('http://127.0.0.1:1');
  const r2 = await dead.stream(body(3));
  t.notOk(r2.ok);
  t.match(r2.error, /ECONNREFUSED/);
  dead.close();
});

t.test('runLevel: closed loop at the given concurrency; deadline truncates', async (t) => {
  const srv = await fakeServer({ gap: 10 });
  const client = new StreamClient(srv.url);
  const { results, truncated } = await runLevel(client, Array.from({ length: 7 }, () => body(3)), 3);
  t.equal(results.length, 7);
  t.ok(results.every((r) => r.ok));
  t.notOk(truncated);
  t.equal(srv.peak(), 3, 'never more than 3 in flight, and 3 reached');
  const start = performance.now();
  const cut = await runLevel(client, Array.from({ length: 50 }, () => body(20)), 2, { deadline: start + 400 });
  t.ok(cut.truncated, 'truncated at the deadline');
  t.ok(performance.now() - start < 2000, 'stopped promptly');
  t.ok(cut.results.length < 50);
  client.close();
  await srv.close();
});

/** A one-level report where each server ran one request; `speed` scales its captions/s. */
function reportOf(servers: [name: string, speed: number][]): BenchReport {
  const s = summarize(1, [{ ok: true, start: 0, firstToken: 100, lastToken: 1100, end: 1100, completionTokens: 11, itl: [100], chunks: 11 }]);
  return {
    version: 1, startedAt: 'x', machine: { hostname: 'h', cpu: 'cpu', cores: 2, memoryGiB: 1, gpus: [], label: 'test machine' },
    config: { prompt: 'p', imageSizes: ['448x448'], outputTokens: 11, concurrency: [1], requestsPerLevel: [1], warmup: 0 },
    servers: [], notes: [],
    levels: servers.map(([server, speed], order) => ({ ...s, captionsPerS: s.captionsPerS * speed, server, order })),
  };
}

t.test('report: ratio row for two servers', async (t) => {
  const md = markdownReport(reportOf([['caprl', 1], ['llama-server', 0.5]]));
  t.match(md, /# caprl-serve benchmark: test machine/);
  t.match(md, /\| 1 \| \*\*caprl \/ llama-server\*\* \| 2\.00x \| 1\.00x \|/);
});

t.test('report: each caprl variant gets a ratio row against llama-server', async (t) => {
  const md = markdownReport(reportOf([['caprl', 1], ['caprl-vision', 1.5], ['llama-server', 0.5]]));
  t.match(md, /\| 1 \| \*\*caprl \/ llama-server\*\* \| 2\.00x \|/);
  t.match(md, /\| 1 \| \*\*caprl-vision \/ llama-server\*\* \| 3\.00x \|/);
  t.notMatch(md, /caprl \/ caprl-vision/);
});

t.test('report: the issue 8 targets line', async (t) => {
  // c=1: TTFT 100 ms, TPOT 100 ms; c=32: TPOT 150 ms, and caprl-vision 5x llama-server's captions/s.
  const level = (server: string, c: number, speed: number, tpotScale: number) => {
    const s = summarize(c, [{ ok: true, start: 0, firstToken: 100, lastToken: 100 + 1000 * tpotScale, end: 1100, completionTokens: 11, itl: [100], chunks: 11 }]);
    return { ...s, captionsPerS: s.captionsPerS * speed, server, order: 0 };
  };
  const base = reportOf([]);
  const md = markdownReport({ ...base, levels: [
    level('caprl-vision', 1, 1, 1), level('llama-server', 1, 1, 1), level('caprl-vision', 32, 5, 1.5), level('llama-server', 32, 1, 3),
  ] });
  t.match(md, /- issue 8 targets, caprl-vision: captions\/s at c=32 5\.00x llama-server's \(target >= 5x\); TTFT p50 at c=1 100 ms \(target < 150\); TPOT p50 c=32 \/ c=1 1\.50x \(target < 2x\)/);
  t.notMatch(md, /issue 8 targets, llama-server/, 'none for llama-server itself');
  // Without llama-server every caprl server still gets its own targets, none compared with another.
  const alone = markdownReport({ ...base, levels: [level('caprl', 1, 1, 1), level('caprl-vision', 1, 1, 1)] });
  t.match(alone, /- issue 8 targets, caprl: TTFT p50 at c=1 100 ms/);
  t.match(alone, /- issue 8 targets, caprl-vision: TTFT p50 at c=1 100 ms/);
  t.notMatch(alone, /captions\/s at c=32/);
});

t.test('bench --endpoint end to end against the fake server', async (t) => {
  const srv = await fakeServer({ gap: 2 });
  const out = mkdtempSync(path.join(os.tmpdir(), 'caprl-bench-test-'));
  t.teardown(() => rmSync(out, { recursive: true, force: true }));
  const log = console.log;
  console.log = () => undefined;
  const stdoutWrite = process.stdout.write;
  process.stdout.write = (() => true) as typeof process.stdout.write;
  let code: number;
  try {
    code = await benchMain(['--endpoint', srv.url, '--concurrency', '1,3', '--requests', '4', '--output-tokens', '5',
      '--image-sizes', '64x48,30x30', '--out', out, '--tag', 'e2e', '--warmup', '1']);
  } finally {
    console.log = log;
    process.stdout.write = stdoutWrite;
  }
  await srv.close();
  t.equal(code, 0);
  t.equal(srv.bodies.length, 1 + 4 + 4, 'warm-up + 2 levels x 4');
  const urls = srv.bodies.map((b) => (b as { messages: { content: { image_url?: { url: string } }[] }[] }).messages[0].content[0].image_url!.url);
  t.equal(new Set(urls).size, urls.length, 'every request has its own image');
  t.ok(urls.every((u) => u.startsWith('data:image/jpeg;base64,')));
  t.ok(existsSync(path.join(out, 'e2e.json')) && existsSync(path.join(out, 'e2e.md')));
  const rep = JSON.parse(readFileSync(path.join(out, 'e2e.json'), 'utf8')) as BenchReport;
  t.same(rep.levels.map((l) => [l.concurrency, l.completed, l.meanOutputTokens]), [[1, 4, 5], [3, 4, 5]]);
  t.ok(rep.finishedAt);
});
