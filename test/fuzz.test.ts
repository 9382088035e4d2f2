// Time-bounded fuzzing of the request and image paths: random mutations of valid requests (the
// JSON tree, the bytes, the content type) and of valid images (bytes, length, base64), sent to
// the real server a few at a time. Every answer must be a well-formed OpenAI success or error
// (never a 5xx), the server must stay up, and afterwards nothing may be left running or held.
// Deterministic for a seed: CAPRL_FUZZ_SEED=N reproduces a run, CAPRL_FUZZ_SECONDS / _ITERATIONS
// make it longer (defaults keep CI short).
import t from 'tap';
import { ImageInputError } from '../src/images/errors.js';
import { prepareImageFromDataUri } from '../src/images/prepare.js';
import { LLAMA_CPP_QWEN25VL_LIMITS } from '../src/images/qwen-resize.js';
import { dataUri, picture } from './helpers/bad-images.js';
import { scrape } from './helpers/prom.js';
import { startTestServer, waitFor } from './helpers/server.js';
import { rng } from '../bench/load.js';

const SEED = Number(process.env.CAPRL_FUZZ_SEED ?? Date.now() % 1_000_000);
const SECONDS = Number(process.env.CAPRL_FUZZ_SECONDS ?? 20);
const ITERATIONS = Number(process.env.CAPRL_FUZZ_ITERATIONS ?? 600);


type Json = null | boolean | number | string | Json[] | { [k: string]: Json };

class Mutator {
  constructor(readonly r: () => number) {}
  int(n: number): number {
    return Math.floor(this.r() * n);
  }
  pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)]!;
  }
  chance(p: number): boolean {
    return this.r() < p;
  }

  value(depth = 0): Json {
    switch (this.int(depth > 2 ? 4 : 6)) {
      case 0: return null;
      case 1: return this.chance(0.5);
      case 2: return this.pick([0, -1, 1, 2, 0.5, -0.0, 1e308, -1e308, 2 ** 53, 2 ** 31, 1e-300, 7, 100000, 3.14159]);
      case 3: return this.pick(['', 'caprl', 'user', 'system', 'image_url', 'text', 'data:image/png;base64,', '\u0000', '\ud800', '💥'.repeat(50),
        'x'.repeat(5000), '<|vision_start|>', '<|im_end|>', 'http://127.0.0.1/', '{"a":1}', 'null', '-1']);
      case 4: return Array.from({ length: this.int(4) }, () => this.value(depth + 1));
      default: {
        const o: Record<string, Json> = {};
        for (let i = this.int(4); i > 0; i--) o[this.pick(['type', 'text', 'url', 'image_url', 'role', 'content', 'x', 'include_usage'])] = this.value(depth + 1);
        return o;
      }
    }
  }

  /** Every (container, key) in a JSON tree. */
  private slots(v: Json, out: [Record<string, Json> | Json[], string | number][] = []): typeof out {
    if (Array.isArray(v)) v.forEach((x, i) => { out.push([v, i]); this.slots(x, out); });
    else if (v && typeof v === 'object') for (const k of Object.keys(v)) { out.push([v, k]); this.slots(v[k]!, out); }
    return out;
  }

  /** One to three structural edits of a request object. */
  tree(req: Record<string, Json>): Json {
    const root = structuredClone(req) as Record<string, Json>;
    for (let n = 1 + this.int(3); n > 0; n--) {
      const slots = this.slots(root);
      const [box, key] = this.pick(slots);
      const op = this.int(6);
      if (op === 0 && !Array.isArray(box)) delete (box as Record<string, Json>)[key as string];
      else if (op === 1 && Array.isArray(box)) box.splice(key as number, 0, structuredClone(box[key as number]!));
      else if (op === 2) (root as Record<string, Json>)[this.pick(['n', 'max_tokens', 'temperature', 'top_p', 'top_k', 'stop', 'seed', 'logprobs', 'top_logprobs', 'stream', 'stream_options', 'min_tokens', 'stop_token_ids', 'ignore_eos', 'response_format', 'tools', 'model'])] = this.value();
      else (box as Record<string | number, Json>)[key] = this.value();
    }
    if (this.chance(0.03)) return this.value();
    return root;
  }

  bytes(b: Buffer, headerSafe = 0): Buffer {
    let out = Buffer.from(b);
    for (let n = 1 + this.int(4); n > 0; n--) {
      const at = headerSafe + this.int(Math.max(1, out.length - headerSafe));
      switch (this.int(5)) {
        case 0: out[at] = this.int(256); break;
        case 1: out = out.subarray(0, at); break;
        case 2: out = Buffer.concat([out.subarray(0, at), out.subarray(Math.min(out.length, at + 1 + this.int(64)))]); break;
        case 3: out = Buffer.concat([out.subarray(0, at), Buffer.from(Array.from({ length: 1 + this.int(32) }, () => this.int(256))), out.subarray(at)]); break;
        default: out = Buffer.concat([out.subarray(0, at), out.subarray(this.int(out.length))]); break;
      }
      if (out.length === 0) break;
    }
    return out;
  }

  /** A base64 string with a few characters broken. */
  base64(s: string): string {
    const chars = [...s];
    for (let n = 1 + this.int(3); n > 0; n--) {
      const at = this.int(Math.max(1, chars.length));
      chars[at] = this.pick(['=', '!', ' ', '\n', '-', '_', '', 'A', '==', '%3D']);
    }
    return chars.join('');
  }
}

async function imageSeeds(): Promise<{ format: string; bytes: Buffer }[]> {
  return [
    { format: 'png', bytes: await picture(40, 32).png().toBuffer() },
    { format: 'jpeg', bytes: await picture(40, 32).jpeg().toBuffer() },
    { format: 'webp', bytes: await picture(40, 32).webp().toBuffer() },
    { format: 'gif', bytes: await picture(40, 32).gif().toBuffer() },
    { format: 'png', bytes: await picture(30, 30, 4).png({ palette: true }).toBuffer() },
  ];
}

t.test(`fuzz: the image path (seed ${SEED})`, async (t) => {
  const m = new Mutator(rng(SEED ^ 0x5eed));
  const seeds = await imageSeeds();
  const end = Date.now() + (SECONDS * 1000) / 4;
  let n = 0;
  const outcomes = { ok: 0, refused: 0 };
  for (; n < ITERATIONS * 2 && Date.now() < end; n++) {
    const s = m.pick(seeds);
    const bytes = m.bytes(s.bytes, m.chance(0.7) ? 12 : 0);
    let uri = dataUri(bytes, `image/${s.format}`);
    if (m.chance(0.15)) uri = `data:image/${s.format};base64,${m.base64(bytes.toString('base64'))}`;
    try {
      const p = await prepareImageFromDataUri(uri, LLAMA_CPP_QWEN25VL_LIMITS);
      if (p.width % 28 !== 0 || p.height % 28 !== 0 || p.rgb.length !== p.width * p.height * 3) {
        t.fail(`iteration ${n}: prepared image ${p.width}x${p.height} with ${p.rgb.length} bytes`);
      }
      outcomes.ok++;
    } catch (err) {
      if (!(err instanceof ImageInputError)) t.fail(`iteration ${n}: ${String(err)} (not an ImageInputError)`);
      outcomes.refused++;
    }
  }
  t.ok(n > 0);
  t.comment(`${n} mutated images: ${outcomes.ok} prepared, ${outcomes.refused} refused`);
});

t.test(`fuzz: requests against the server (seed ${SEED})`, async (t) => {
  const m = new Mutator(rng(SEED));
  const s = await startTestServer({
    engine: { nThreads: 1, maxModelLen: 256, maxSeqs: 4 },
    server: { bodyLimit: 512 * 1024, maxNumSeqs: 4, operations: { maxNumSeqs: 4, maxWaitingRequests: 64 } },
  });
  t.teardown(() => s.close());
  const images = await imageSeeds();
  const rss0 = process.memoryUsage().rss;

  const valid = (): Record<string, Json> => {
    const img = m.pick(images);
    const content: Json = m.chance(0.5)
      ? 'Describe the picture.'
      : [{ type: 'image_url', image_url: { url: dataUri(m.chance(0.5) ? m.bytes(img.bytes, 12) : img.bytes, `image/${img.format}`) } }, { type: 'text', text: 'Caption it.' }];
    const req: Record<string, Json> = { model: 'caprl', messages: [{ role: 'user', content }], max_tokens: 1 + m.int(4), temperature: m.pick([0, 0.7, 1]) };
    if (m.chance(0.3)) req.stream = true;
    if (m.chance(0.2)) req.n = 2;
    if (m.chance(0.2)) req.seed = m.int(1000);
    return req;
  };

  const statuses = new Map<number, number>();
  const failures: string[] = [];
  const check = async (i: number, body: string | Buffer, contentType: string): Promise<void> => {
    const where = () => `iteration ${i} (seed ${SEED}), body ${JSON.stringify(body.toString().slice(0, 300))}`;
    let res: Response;
    try {
      res = await fetch(`${s.baseURL}/chat/completions`, { method: 'POST', headers: { 'content-type': contentType }, body: typeof body === 'string' ? body : new Uint8Array(body) });
    } catch (err) {
      failures.push(`${where()}: the request failed: ${String(err)}`);
      return;
    }
    statuses.set(res.status, (statuses.get(res.status) ?? 0) + 1);
    const text = await res.text();
    if (res.status >= 500) {
      failures.push(`${where()}: HTTP ${res.status} ${text.slice(0, 300)}`);
      return;
    }
    if (res.status === 200 && (res.headers.get('content-type') ?? '').startsWith('text/event-stream')) {
      const events = text.split('\n\n').filter(Boolean);
      if (events[events.length - 1] !== 'data: [DONE]') failures.push(`${where()}: stream without [DONE]`);
      for (const e of events.slice(0, -1)) {
        if (!e.startsWith('data: ')) { failures.push(`${where()}: bad SSE line ${e.slice(0, 100)}`); break; }
        const c = JSON.parse(e.slice(6)) as { object?: string; error?: { type?: string } };
        if (c.error) failures.push(`${where()}: error inside a stream: ${e.slice(0, 300)}`);
        else if (c.object !== 'chat.completion.chunk') failures.push(`${where()}: odd chunk ${e.slice(0, 200)}`);
      }
      return;
    }
    let parsed: Record<string, unknown>;
    try {
      parsed = JSON.parse(text) as Record<string, unknown>;
    } catch {
      failures.push(`${where()}: HTTP ${res.status} with a body that is not JSON: ${text.slice(0, 200)}`);
      return;
    }
    if (res.status === 200) {
      const ok = parsed.object === 'chat.completion' && Array.isArray(parsed.choices) &&
        (parsed.choices as { message?: { content?: unknown } }[]).every((c) => typeof c.message?.content === 'string') &&
        typeof (parsed.usage as { total_tokens?: unknown })?.total_tokens === 'number';
      if (!ok) failures.push(`${where()}: malformed completion ${text.slice(0, 300)}`);
      return;
    }
    const e = parsed.error as Record<string, unknown> | undefined;
    const ok = e && typeof e.message === 'string' && e.message.length > 0 && typeof e.type === 'string' &&
      (e.param === null || typeof e.param === 'string') && (e.code === null || typeof e.code === 'string');
    if (!ok) failures.push(`${where()}: HTTP ${res.status} without an OpenAI error object: ${text.slice(0, 300)}`);
  };

  const end = Date.now() + SECONDS * 1000;
  let i = 0;
  const worker = async (): Promise<void> => {
    while (i < ITERATIONS && Date.now() < end && failures.length < 20) {
      const n = i++;
      const kind = m.int(10);
      let body: string | Buffer;
      let contentType = 'application/json';
      if (kind < 6) body = JSON.stringify(m.tree(valid()));
      else if (kind < 9) body = m.bytes(Buffer.from(JSON.stringify(valid())));
      else {
        body = JSON.stringify(valid());
        contentType = m.pick(['text/plain', 'application/json; charset=latin1', 'application/x-www-form-urlencoded', '', 'application/JSON', 'multipart/form-data; boundary=x']);
      }
      await check(n, body, contentType);
    }
  };
  await Promise.all(Array.from({ length: 4 }, worker));
  t.comment(`${i} requests: ${[...statuses].sort((a, b) => a[0] - b[0]).map(([k, v]) => `${k}x${v}`).join(' ')}`);
  t.same(failures, [], 'every answer well-formed, no 5xx');
  t.ok(i >= Math.min(ITERATIONS, 20), 'enough iterations ran');

  // Afterwards: up, nothing running, nothing held.
  t.equal((await fetch(`${s.url}/health`)).status, 200);
  t.ok(await waitFor(() => s.engine.liveCount === 0 && s.engine.stats().kvUsedCells === 0, 10_000), 'no generation left, KV cells free');
  const sc = await scrape(s.url);
  t.equal(sc.value('caprl:num_requests_preprocessing'), 0, 'no request left in preparation');
  const ok = await s.client.chat.completions.create({ model: 'caprl', messages: [{ role: 'user', content: 'still fine?' }], max_tokens: 2 });
  t.equal(ok.choices[0]!.message.role, 'assistant');
  const grown = (process.memoryUsage().rss - rss0) / 2 ** 20;
  t.ok(grown < 400, `RSS grew ${grown.toFixed(0)} MiB over the run (bounded)`);
});
