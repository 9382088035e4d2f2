// `caprl eval` (Prism) end to end on the tiny model, captioner and answerer both in this process
// (the answerer is the tiny model's text side): a stage-1 run stopped part-way then resumed,
// every item once in captions.jsonl and details.jsonl, caption / question failures as error
// items, the summary equal to what details.jsonl says, and the same results under the same seed.
import t from 'tap';
import { spawn } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import sharp from 'sharp';
import { runEvalCommand } from '../src/workflows/prism-eval.js';
import { tinyModel } from './helpers/models.js';
import { startTestServer } from './helpers/server.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const bin = path.join(root, 'bin', 'caprl.js');
const tmp = mkdtempSync(path.join(os.tmpdir(), 'caprl-wf-eval-'));
t.teardown(() => rmSync(tmp, { recursive: true, force: true }));

type Rec = Record<string, unknown> & { id: string };
const read = (file: string): Rec[] => readFileSync(file, 'utf8').split('\n').filter((l) => l !== '').map((l) => JSON.parse(l) as Rec);

async function png(seed: number): Promise<Buffer> {
  const raw = Buffer.alloc(64 * 64 * 3);
  for (let i = 0; i < raw.length; i++) raw[i] = (i * (seed + 2) * 11 + seed) & 255;
  return sharp(raw, { raw: { width: 64, height: 64, channels: 3 } }).png().toBuffer();
}

const DOG = 'What color is the dog?\n   - A) Brown\n   - B) White\n   - C) Black\n   - D) Gray';
const ITEMS = [
  { image: 'img/a.png', question: DOG, answer: 'C' },
  { id: 'q2', image: 'img/b.png', question: 'How many people are there?', options: ['one', 'two', 'three'], answer: 'B' },
  { image: 'img/a.png', question: 'Is it day?\nA) yes\nB) no', answer: 'A' },
  { image: 'img/broken.png', question: DOG, answer: 'A' },
  { image: 'img/b.png', question: 'A question without options', answer: 'A' },
];
const IDS = ['line:1', 'q2', 'line:3', 'line:4', 'line:5'];

t.test('caprl eval', async (t) => {
  const { model, mmproj } = await tinyModel();
  mkdirSync(path.join(tmp, 'img'));
  writeFileSync(path.join(tmp, 'img/a.png'), await png(1));
  writeFileSync(path.join(tmp, 'img/b.png'), await png(2));
  writeFileSync(path.join(tmp, 'img/broken.png'), Buffer.concat([(await png(3)).subarray(0, 33), Buffer.alloc(64)]));
  const data = path.join(tmp, 'eval.jsonl');
  writeFileSync(data, `${ITEMS.map((x) => JSON.stringify(x)).join('\n')}\n`);
  const flags = (out: string, ...more: string[]) => [
    '-i', data, '-o', out, '--model', model, '--mmproj', mmproj, '--answerer-model', model,
    '--n', '2', '--max-tokens', '4', '--seed', '3', '--kv-cache-tokens', '4096', '--max-model-len', '2048',
    '--max-num-seqs', '4', '--threads', '1', '--no-progress', ...more,
  ];

  const out = path.join(tmp, 'run1');
  t.test('a stopped stage 1, then the whole evaluation resumed', async (t) => {
    t.equal(await runEvalCommand(flags(out, '--stage', 'caption', '--limit', '2')), 0);
    t.same(read(path.join(out, 'captions.jsonl')).map((r) => r.id).sort(), ['line:1', 'q2']);
    t.equal(await runEvalCommand(flags(out)), 0);

    const caps = read(path.join(out, 'captions.jsonl'));
    t.same(caps.map((r) => r.id).sort(), [...IDS].sort(), 'every item captioned once');
    for (const c of caps.filter((r) => r.id !== 'line:4')) t.equal((c.captions as string[]).length, 2, `${c.id}: n=2 captions`);
    t.match(caps.find((r) => r.id === 'line:4')!.error, /could not decode the image/);

    const details = read(path.join(out, 'details.jsonl'));
    t.same(details.map((r) => r.id).sort(), [...IDS].sort(), 'every item answered once');
    const by = new Map(details.map((r) => [r.id, r]));
    t.match(by.get('line:4'), { error: /^caption: could not decode/, error_stage: 'caption' });
    t.match(by.get('line:5'), { error: /^question: question: no lettered options/, error_stage: 'question' });
    const scored = details.filter((r) => r.error === null);
    t.equal(scored.length, 3);
    for (const r of scored) {
      const preds = r.predictions as (string | null)[];
      const correct = r.correct as boolean[];
      t.equal(preds.length, 2);
      t.same(correct, preds.map((p) => p === r.answer), `${r.id}: right iff the letter read is the answer`);
      t.equal(r.accuracy, correct.filter(Boolean).length / 2);
      t.equal(r.best_of_n, correct.some(Boolean) ? 1 : 0);
      t.same(r.captions, caps.find((c) => c.id === r.id)!.captions, 'the captions judged are stage 1\'s');
      t.match(r.question, /Can not answer based on the caption$/);
    }
    t.same([by.get('line:1')!.answer, by.get('q2')!.answer, by.get('line:3')!.answer], ['C', 'B', 'A']);
    t.equal(by.get('q2')!.cannot_answer, 'D');

    const summary = JSON.parse(readFileSync(path.join(out, 'summary.json'), 'utf8')) as Record<string, number | string | number[]>;
    t.match(summary, { items: 5, scored: 3, errors: 2, n: 2, seed: 3, shuffle_options: false, captioner: 'tiny-f16.gguf', answerer: 'tiny-f16.gguf' });
    const mean = scored.reduce((x, r) => x + (r.accuracy as number), 0) / 3;
    const bon = scored.reduce((x, r) => x + (r.best_of_n as number), 0) / 3;
    t.equal(summary.mean_accuracy, mean, 'mean accuracy over items');
    t.equal(summary.best_of_n, bon, 'best-of-n over items');
    t.ok((summary.best_of_n as number) >= (summary.mean_accuracy as number));
    t.equal((summary.per_sample_accuracy as number[]).length, 2);

    // Nothing left: a rerun writes nothing and reports the same.
    t.equal(await runEvalCommand(flags(out)), 0);
    t.equal(read(path.join(out, 'details.jsonl')).length, 5);
    t.match(JSON.parse(readFileSync(path.join(out, 'summary.json'), 'utf8')), { mean_accuracy: mean, best_of_n: bon });
  });

  t.test('the same seed, the same evaluation (option shuffles included)', async (t) => {
    const x = path.join(tmp, 'shuffled-1');
    const y = path.join(tmp, 'shuffled-2');
    // One request at a time: seeded sampling repeats exactly for the same engine batching.
    const sequential = ['--shuffle-options', '--concurrency', '1', '--answer-concurrency', '1'];
    t.equal(await runEvalCommand(flags(x, ...sequential)), 0);
    t.equal(await runEvalCommand(flags(y, ...sequential)), 0);
    const dx = read(path.join(x, 'details.jsonl')).sort((p, q) => (p.id < q.id ? -1 : 1));
    const dy = read(path.join(y, 'details.jsonl')).sort((p, q) => (p.id < q.id ? -1 : 1));
    t.same(dx, dy, 'identical details');
    for (const r of dx.filter((d) => d.error === null)) {
      const asked = r.asked as string[];
      const expected = r.expected as string[];
      t.equal(asked.length, 2);
      asked.forEach((q, k) => {
        const right = q.split('\n').find((l) => l.startsWith(`   - ${expected[k]})`));
        const mc = ITEMS[IDS.indexOf(r.id)]!;
        const text = mc.options ? mc.options[mc.answer.charCodeAt(0) - 65] : mc.question.split('\n').find((l) => new RegExp(`^\\s*-?\\s*${mc.answer}\\)`).test(l))!.replace(/^.*?\)\s*/, '');
        t.equal(right?.replace(/^.*?\)\s*/, ''), text, `${r.id}[${k}]: the expected letter names the right option`);
      });
      t.same(r.correct, (r.predictions as (string | null)[]).map((p, k) => p === expected[k]));
    }
  });

  t.test('an answerer behind a server (--answerer-endpoint), stage 2 alone', async (t) => {
    const server = await startTestServer({ textOnly: true, engine: { nThreads: 1, maxSeqs: 4, maxModelLen: 2048 } });
    t.teardown(() => server.close());
    const dir = path.join(tmp, 'endpoint-answers');
    mkdirSync(dir);
    copyFileSync(path.join(out, 'captions.jsonl'), path.join(dir, 'captions.jsonl'));
    t.equal(await runEvalCommand([
      '-i', data, '-o', dir, '--stage', 'answer', '--answerer-endpoint', server.baseURL, '--answerer-name', 'caprl',
      '--answerer-temperature', '0', '--answerer-max-tokens', '6', '--no-progress',
    ]), 0);
    const details = read(path.join(dir, 'details.jsonl'));
    t.same(details.map((r) => r.id).sort(), [...IDS].sort());
    for (const r of details.filter((d) => d.error === null)) {
      t.equal((r.responses as string[]).length, 2);
      t.same(r.correct, (r.predictions as (string | null)[]).map((p) => p === r.answer));
    }
    t.match(JSON.parse(readFileSync(path.join(dir, 'summary.json'), 'utf8')), { items: 5, scored: 3, errors: 2, answerer: 'caprl', captioner: null });
    const served = server.engine.stats().promptTokensTotal;
    t.ok(served > 0, `the server answered (${served} prompt tokens)`);
  });

  t.test('usage errors', async (t) => {
    const res = await new Promise<{ code: number | null; stderr: string }>((resolve) => {
      const child = spawn(process.execPath, [bin, 'eval', '-i', data, '-o', path.join(tmp, 'x'), '--model', model, '--mmproj', mmproj], { stdio: ['ignore', 'ignore', 'pipe'] });
      let stderr = '';
      child.stderr.on('data', (c) => (stderr += c));
      child.on('exit', (code) => resolve({ code, stderr }));
    });
    t.equal(res.code, 2);
    t.match(res.stderr, /caprl eval: error: give one answerer: --answerer-model MODEL .* or --answerer-endpoint URL/);
  });
});
