// `caprl caption` on the tiny model (random weights: the captions are gibberish; what is tested
// is the plumbing): a run stopped part-way (--limit) plus a torn last line, then resumed, covers
// the input exactly once; N shards partition it; a bad image is an error record; under a seed
// the captions do not depend on resume, shards or concurrency; --endpoint spreads requests over
// two running servers; the CLI runs it all as a subprocess.
import t from 'tap';
import { spawn } from 'node:child_process';
import { appendFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import sharp from 'sharp';
import { Engine } from '../src/engine/engine.js';
import { EndpointCaptioner, EngineCaptioner, runCaptionJob, samplingSettings, type Captioner } from '../src/workflows/caption.js';
import { EndpointPool } from '../src/workflows/endpoints.js';
import { openInputSource } from '../src/workflows/input-sources.js';
import { tinyModel } from './helpers/models.js';
import { startTestServer } from './helpers/server.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const bin = path.join(root, 'bin', 'caprl.js');
const tmp = mkdtempSync(path.join(os.tmpdir(), 'caprl-wf-caption-'));
t.teardown(() => rmSync(tmp, { recursive: true, force: true }));

type Rec = Record<string, unknown> & { id: string };

function readRecords(file: string): Rec[] {
  const text = readFileSync(file, 'utf8');
  if (text.length > 0) {
    if (!text.endsWith('\n')) throw new Error(`${file} does not end with a newline`);
  }
  return text.split('\n').filter((l) => l !== '').map((l) => JSON.parse(l) as Rec);
}

async function picture(seed: number, w = 64, h = 64): Promise<Buffer> {
  const raw = Buffer.alloc(w * h * 3);
  for (let i = 0; i < raw.length; i++) raw[i] = (i * (seed + 3) * 7 + seed * 31) & 255;
  return sharp(raw, { raw: { width: w, height: h, channels: 3 } }).png().toBuffer();
}

// The image set: 5 good pictures (one nested, one JPEG), a PNG that does not decode (its
// signature is right, the rest is garbage), and a text file that is ignored.
const images = path.join(tmp, 'images');
const GOOD = ['a.png', 'b.png', 'nested/c.png', 'nested/deeper/d.jpg', 'e.webp'];
const BAD = 'broken.png';
const ALL = [...GOOD, BAD].sort();

t.before(async () => {
  for (const [i, f] of GOOD.entries()) {
    mkdirSync(path.dirname(path.join(images, f)), { recursive: true });
    let img = sharp(await picture(i));
    if (f.endsWith('.jpg')) img = img.jpeg();
    if (f.endsWith('.webp')) img = img.webp();
    writeFileSync(path.join(images, f), await img.toBuffer());
  }
  writeFileSync(path.join(images, BAD), Buffer.concat([Buffer.from('89504e470d0a1a0a', 'hex'), Buffer.from('definitely not the rest of a PNG')]));
  writeFileSync(path.join(images, 'notes.txt'), 'ignored');
});

const settings = samplingSettings({ max_tokens: 4, temperature: 1.0, top_p: 1.0 });

t.test('in-process captioning', async (t) => {
  const { model, mmproj } = await tinyModel();
  const engine = new Engine({ model, mmproj, nCtx: 4096, maxSeqs: 4, nBatch: 512, nThreads: 1, logLevel: 'error' });
  t.teardown(() => engine.close());
  const captioner = new EngineCaptioner(engine, 'tiny', { maxSeqs: 4 });
  const source = await openInputSource(images);

  const full = path.join(tmp, 'full.jsonl');
  let reference: Map<string, Rec>;

  t.test('a stopped run, a torn line, a resumed run: every image exactly once', async (t) => {
    const out = path.join(tmp, 'resumed.jsonl');
    // One request at a time wherever captions are compared: the engine's batched decoding is not
    // bit-for-bit batch invariant with images, so seeded captions only repeat for the same batching.
    const first = await runCaptionJob({ source, output: out, captioner, settings, seed: 11, limit: 3, concurrency: 1 });
    t.match(first, { planned: 3, written: 3, alreadyDone: 0, stopped: false });
    t.equal(readRecords(out).length, 3);
    // The crash: a half-written line at the end.
    appendFileSync(out, '{"id":"nested/c.png","image":"x","capt');
    const second = await runCaptionJob({ source, output: out, captioner, settings, seed: 11, concurrency: 1 });
    t.ok(second.tornBytes > 0, 'the torn line was cut');
    t.match(second, { alreadyDone: 3, planned: 3, written: 3 });
    t.equal(first.errors + second.errors, 1, 'one error record (the broken image)');
    const recs = readRecords(out);
    t.same(recs.map((r) => r.id).sort(), ALL, 'the union of the two runs is the input, once each');
    const bad = recs.find((r) => r.id === BAD)!;
    t.match(bad, { caption: null, prompt_tokens: null, model: 'tiny' });
    t.match(bad.error, /could not decode the image/);
    t.equal(bad.error_code, 'image_decode_failed');
    for (const r of recs.filter((x) => x.id !== BAD)) {
      t.match(r, { image: path.join(images, r.id), model: 'tiny', error: null, finish_reason: /^(stop|length)$/ });
      t.type(r.caption, 'string');
      t.ok((r.prompt_tokens as number) > 9, 'prompt tokens count the image');
      t.ok((r.completion_tokens as number) >= 1 && (r.completion_tokens as number) <= 4);
      t.type(r.seconds, 'number');
    }
    const third = await runCaptionJob({ source, output: out, captioner, settings, seed: 11 });
    t.match(third, { planned: 0, written: 0, alreadyDone: 6 }, 'a finished run has nothing left to do');

    // The same seed in one go: the same captions (the seed follows the record id, not the order).
    const once = await runCaptionJob({ source, output: full, captioner, settings, seed: 11, concurrency: 1 });
    t.equal(once.written, 6);
    reference = new Map(readRecords(full).map((r) => [r.id, r]));
    for (const r of recs) t.equal(r.caption, reference.get(r.id)!.caption, `same caption for ${r.id}`);

    // --retry-errors: the error record is removed and tried again (and fails again).
    const retry = await runCaptionJob({ source, output: out, captioner, settings, seed: 11, retryErrors: true });
    t.match(retry, { retried: 1, written: 1, errors: 1, alreadyDone: 5 });
    t.equal(readRecords(out).filter((r) => r.id === BAD).length, 1, 'still one record for the bad image');
  });

  t.test('--shard i/N: the shards partition the input', async (t) => {
    const ids: string[][] = [];
    for (let i = 0; i < 3; i++) {
      const out = path.join(tmp, `shard-${i}.jsonl`);
      const r = await runCaptionJob({ source, output: out, captioner, settings, seed: 11, shard: { index: i, count: 3 }, concurrency: 1 });
      t.equal(r.written, r.planned);
      const recs = readRecords(out);
      ids.push(recs.map((x) => x.id));
      for (const x of recs) t.equal(x.caption, reference.get(x.id)!.caption, `shard ${i}: same caption for ${x.id} as unsharded`);
    }
    const flat = ids.flat();
    t.same([...flat].sort(), ALL, 'union = input');
    t.equal(new Set(flat).size, flat.length, 'disjoint');
  });

  t.test('JSONL lists: prompts, data URIs, missing files, bad lines; n captions', async (t) => {
    const list = path.join(tmp, 'list.jsonl');
    const uri = `data:image/png;base64,${(await picture(9)).toString('base64')}`;
    writeFileSync(list, [
      JSON.stringify({ id: 'one', image: 'images/a.png', prompt: 'Describe the colors.' }),
      JSON.stringify({ image: uri, id: 'inline' }),
      'images/missing.png',
      '{"image": ',
      JSON.stringify({ id: 'marker', image: 'images/b.png', prompt: `sneaky ${engine.info.mediaMarker}` }),
      '',
    ].join('\n'));
    const out = path.join(tmp, 'list-out.jsonl');
    const r = await runCaptionJob({ source: await openInputSource(list), output: out, captioner, settings, seed: 3, n: 2 });
    t.match(r, { written: 5, errors: 3 });
    const recs = new Map(readRecords(out).map((x) => [x.id, x]));
    t.equal(recs.get('one')!.prompt, 'Describe the colors.');
    for (const id of ['one', 'inline']) {
      const x = recs.get(id)!;
      t.equal((x.captions as string[]).length, 2, 'n=2: two captions');
      t.equal(x.caption, (x.captions as string[])[0]);
      t.equal((x.finish_reasons as string[]).length, 2);
    }
    t.match(recs.get('images/missing.png')!.error, /no such file/);
    t.match(recs.get('line:4')!.error, /line 4: not valid JSON/);
    t.match(recs.get('marker')!.error, /reserved marker/);
  });

  t.test('a stop signal: records in flight are finished and written, nothing else starts', async (t) => {
    const out = path.join(tmp, 'stopped.jsonl');
    const stop = new AbortController();
    let seen = 0;
    const stopping: Captioner = {
      model: captioner.model,
      defaultConcurrency: 2,
      caption: async (...args) => {
        if (++seen === 2) stop.abort();
        return captioner.caption(...args);
      },
    };
    const r = await runCaptionJob({ source, output: out, captioner: stopping, settings, concurrency: 2, stop: stop.signal });
    t.equal(r.stopped, true);
    t.equal(r.written, seen, 'every started record was written');
    t.ok(r.written < 6);
    const again = await runCaptionJob({ source, output: out, captioner, settings });
    t.equal(again.alreadyDone + again.written, 6, 'a rerun finishes the rest');
  });
});

t.test('--endpoint: two running servers share the work', async (t) => {
  const a = await startTestServer({ engine: { nThreads: 1, maxSeqs: 4, maxModelLen: 1024 } });
  t.teardown(() => a.close());
  const b = await startTestServer({ engine: { nThreads: 1, maxSeqs: 4, maxModelLen: 1024 } });
  t.teardown(() => b.close());
  const pool = new EndpointPool([a.baseURL, b.url], { backoffMs: 10 });
  const captioner = new EndpointCaptioner(pool, 'caprl', 'caprl');
  const out = path.join(tmp, 'endpoint.jsonl');
  const r = await runCaptionJob({ source: await openInputSource(images), output: out, captioner, settings, seed: 5, concurrency: 4, n: 2 });
  t.match(r, { written: 6, errors: 1 });
  const recs = readRecords(out);
  t.same(recs.map((x) => x.id).sort(), ALL);
  const bad = recs.find((x) => x.id === BAD)!;
  t.match(bad.error, /HTTP 400.*could not decode the image/, 'the server\'s 400 becomes the record\'s error');
  t.equal(bad.error_code, 'image_decode_failed');
  for (const x of recs.filter((y) => y.id !== BAD)) {
    t.match(x, { model: 'caprl', error: null });
    t.equal((x.captions as string[]).length, 2);
  }
  const served = pool.stats.map((s) => s.completed);
  t.ok(served.every((c) => c > 0), `both servers answered (${served.join(', ')})`);
});

function run(args: string[]): Promise<{ code: number | null; stderr: string; stdout: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [bin, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    let stdout = '';
    child.stderr.on('data', (c) => (stderr += c));
    child.stdout.on('data', (c) => (stdout += c));
    child.on('exit', (code) => resolve({ code, stderr, stdout }));
  });
}

t.test('caprl caption (the command)', async (t) => {
  const { model, mmproj } = await tinyModel();
  const out = path.join(tmp, 'cli.jsonl');
  const common = [
    'caption', images, '-o', out, '--model', model, '--mmproj', mmproj, '--max-tokens', '4', '--seed', '1',
    '--kv-cache-tokens', '4096', '--max-model-len', '1024', '--max-num-seqs', '4', '--threads', '1',
  ];
  const first = await run([...common, '--limit', '2']);
  t.equal(first.code, 0, first.stderr);
  t.match(first.stderr, /caprl caption: 2 records written to .*cli\.jsonl \(0 errors\) in \d+s, [\d.]+ img\/s/);
  t.notMatch(first.stderr, /\r/, 'no terminal redraws in a log');
  const second = await run(common);
  t.equal(second.code, 0, second.stderr);
  t.match(second.stderr, /4 records written .*\(1 error\).*2 already done/);
  t.same(readRecords(out).map((x) => x.id).sort(), ALL);

  const bad = await run(['caption', images, '-o', out, '--model', model, '--shard', '3/3']);
  t.equal(bad.code, 2);
  t.match(bad.stderr, /--shard: i must be in \[0, 2\]/);
  const noOut = await run(['caption', images, '--model', model]);
  t.equal(noOut.code, 2);
  t.match(noOut.stderr, /-o OUT\.jsonl/);
  const both = await run(['caption', images, '-o', out, '--model', model, '--endpoint', 'http://127.0.0.1:1']);
  t.equal(both.code, 2);
  const temp = await run(['caption', images, '-o', out, '--model', model, '--temperature', '-1']);
  t.equal(temp.code, 2);
  t.match(temp.stderr, /argument --temperature: `temperature` must be non-negative/);
  const missing = await run(['caption', path.join(tmp, 'nothing'), '-o', out, '--model', model]);
  t.equal(missing.code, 2);
  t.match(missing.stderr, /input not found/);
  const down = await run(['caption', images, '-o', path.join(tmp, 'down.jsonl'), '--endpoint', 'http://127.0.0.1:9', '--retries', '1', '--no-progress']);
  t.equal(down.code, 1, 'no server: exit 1');
  t.match(down.stderr, /no server answered/);
});
