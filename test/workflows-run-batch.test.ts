// `caprl run-batch` on the tiny model: vLLM's batch file format in and out, through the HTTP
// app's own handlers (so a line's response is what the same request over HTTP gets), in input
// order, resumable by custom_id, with refused lines as error lines, not stops.
import t from 'tap';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Engine } from '../src/engine/engine.js';
import { buildServer } from '../src/entrypoints/openai/server.js';
import { BatchInputError, runBatchFile } from '../src/entrypoints/openai/run-batch.js';
import { tinyModel } from './helpers/models.js';
import { pngDataUri } from './helpers/server.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const bin = path.join(root, 'bin', 'caprl.js');
const tmp = mkdtempSync(path.join(os.tmpdir(), 'caprl-wf-batch-'));
t.teardown(() => rmSync(tmp, { recursive: true, force: true }));

type Line = {
  id: string;
  custom_id: string;
  response: { status_code: number; request_id: string; body: Record<string, unknown> | null };
  error: unknown;
};

function readLines(file: string): Line[] {
  return readFileSync(file, 'utf8').split('\n').filter((l) => l !== '').map((l) => JSON.parse(l) as Line);
}

const chat = (extra: Record<string, unknown>) => ({ model: 'caprl', max_tokens: 3, seed: 1, temperature: 0.8, ...extra });

t.test('run-batch', async (t) => {
  const { model, mmproj } = await tinyModel();
  const engine = new Engine({ model, mmproj, nCtx: 4096, maxSeqs: 4, nBatch: 512, nThreads: 1, logLevel: 'error' });
  const app = buildServer({ engine, servedModelNames: ['caprl'], modelPath: model });
  await app.ready();
  t.teardown(async () => {
    await app.close();
    await engine.close();
  });
  const image = await pngDataUri(64, 64);
  const requests = [
    // Greedy: the parity check below compares with a request run alone, and only greedy text
    // tokens are guaranteed the same whatever the engine batches them with.
    { custom_id: 'text', method: 'POST', url: '/v1/chat/completions', body: chat({ temperature: 0, messages: [{ role: 'user', content: 'Hello' }] }) },
    {
      custom_id: 'image', method: 'POST', url: '/v1/chat/completions',
      body: chat({ n: 2, messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: image } }, { type: 'text', text: 'Describe.' }] }] }),
    },
    { custom_id: 'bad-temperature', method: 'POST', url: '/v1/chat/completions', body: chat({ temperature: -1, messages: [{ role: 'user', content: 'x' }] }) },
    { custom_id: 'embeddings', method: 'POST', url: '/v1/embeddings', body: { input: 'x' } },
    { custom_id: 'stream', method: 'POST', url: '/v1/chat/completions', body: chat({ stream: true, messages: [{ role: 'user', content: 'x' }] }) },
    { custom_id: 'unknown-model', method: 'POST', url: '/v1/chat/completions', body: chat({ model: 'gpt-4', messages: [{ role: 'user', content: 'x' }] }) },
    { custom_id: 'text-2', method: 'POST', url: '/v1/chat/completions', body: chat({ seed: 2, messages: [{ role: 'user', content: 'Hello again' }] }) },
  ];
  const input = path.join(tmp, 'in.jsonl');
  writeFileSync(input, `${requests.map((r) => JSON.stringify(r)).join('\n')}\n\n`);
  const output = path.join(tmp, 'out.jsonl');

  t.test('a stopped run, then a resumed one: every request once, in input order', async (t) => {
    const first = await runBatchFile({ input, output, app, concurrency: 4, limit: 3 });
    t.match(first, { requests: 7, written: 3, failed: 1, alreadyDone: 0 });
    t.same(readLines(output).map((l) => l.custom_id), ['text', 'image', 'bad-temperature'], 'the first three, in order');
    const second = await runBatchFile({ input, output, app, concurrency: 4 });
    t.match(second, { alreadyDone: 3, written: 4, failed: 3 });
    const lines = readLines(output);
    t.same(lines.map((l) => l.custom_id), requests.map((r) => r.custom_id), 'input order over both runs');
    t.equal(new Set(lines.map((l) => l.id)).size, lines.length, 'unique ids');
    for (const l of lines) {
      t.match(l.id, /^caprl-[0-9a-f]{32}$/);
      t.match(l.response.request_id, /^caprl-batch-[0-9a-f]{32}$/);
    }
    const by = new Map(lines.map((l) => [l.custom_id, l]));

    const text = by.get('text')!;
    t.match(text, { response: { status_code: 200, body: { object: 'chat.completion', model: 'caprl' } }, error: null });
    const usage = text.response.body!.usage as { completion_tokens: number };
    t.ok(usage.completion_tokens >= 1 && usage.completion_tokens <= 3);

    const img = by.get('image')!;
    t.equal(img.response.status_code, 200);
    t.equal((img.response.body!.choices as unknown[]).length, 2, 'n=2 through the handler');
    t.ok((img.response.body!.usage as { prompt_tokens: number }).prompt_tokens > 9);

    t.match(by.get('bad-temperature'), {
      response: { status_code: 400, body: null },
      error: { error: { type: 'invalid_request_error', param: 'temperature' } },
    });
    t.match(by.get('embeddings'), { response: { status_code: 400, body: null }, error: /URL \/v1\/embeddings was used\. Supported endpoints: \/v1\/chat\/completions/ });
    t.match(by.get('stream'), { response: { status_code: 400 }, error: 'Request must not be sent in stream mode' });
    t.match(by.get('unknown-model'), { response: { status_code: 404 }, error: { error: { message: 'The model `gpt-4` does not exist.' } } });

    // Parity: the same request over the app gives the same completion (seeded).
    const direct = await app.inject({ method: 'POST', url: '/v1/chat/completions', payload: requests[0]!.body });
    t.equal(direct.statusCode, 200);
    t.same((direct.json() as { choices: unknown[] }).choices, text.response.body!.choices);

    const third = await runBatchFile({ input, output, app, concurrency: 4 });
    t.match(third, { written: 0, alreadyDone: 7 });
  });

  t.test('malformed input stops before any work', async (t) => {
    const dup = path.join(tmp, 'dup.jsonl');
    writeFileSync(dup, `${JSON.stringify(requests[0])}\n${JSON.stringify(requests[0])}\n`);
    const out = path.join(tmp, 'dup-out.jsonl');
    await t.rejects(runBatchFile({ input: dup, output: out, app, concurrency: 2 }), BatchInputError);
    t.equal(readFileSync(out, 'utf8'), '', 'nothing written');
    const broken = path.join(tmp, 'broken.jsonl');
    writeFileSync(broken, `${JSON.stringify(requests[0])}\n{"custom_id": 5}\n`);
    await t.rejects(runBatchFile({ input: broken, output: out, app, concurrency: 2 }), /line 2: "custom_id" must be a non-empty string/);
  });
});

t.test('caprl run-batch (the command)', async (t) => {
  const { model } = await tinyModel();
  const input = path.join(tmp, 'cli-in.jsonl');
  const output = path.join(tmp, 'cli-out.jsonl');
  writeFileSync(input, [1, 2, 3].map((i) => JSON.stringify({
    custom_id: `r${i}`, method: 'POST', url: '/v1/chat/completions',
    body: { model: 'tiny', max_tokens: 2, messages: [{ role: 'user', content: `Hi ${i}` }] },
  })).join('\n'));
  const res = await new Promise<{ code: number | null; stderr: string }>((resolve) => {
    const child = spawn(process.execPath, [
      bin, 'run-batch', '-i', input, '-o', output, '--model', model, '--served-model-name', 'tiny',
      '--kv-cache-tokens', '2048', '--max-model-len', '512', '--max-num-seqs', '2', '--threads', '1', '--no-progress',
    ], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (c) => (stderr += c));
    child.on('exit', (code) => resolve({ code, stderr }));
  });
  t.equal(res.code, 0, res.stderr);
  t.match(res.stderr, /caprl run-batch: 3 of 3 requests written to .*cli-out\.jsonl \(0 failed\)/);
  const lines = readLines(output);
  t.same(lines.map((l) => [l.custom_id, l.response.status_code, (l.response.body as { model?: string }).model]), [['r1', 200, 'tiny'], ['r2', 200, 'tiny'], ['r3', 200, 'tiny']]);

  writeFileSync(input, '{"custom_id": "x"}\n');
  const bad = await new Promise<{ code: number | null; stderr: string }>((resolve) => {
    const child = spawn(process.execPath, [bin, 'run-batch', '-i', input, '-o', path.join(tmp, 'bad-out.jsonl'), '--model', model, '--no-progress'], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (c) => (stderr += c));
    child.on('exit', (code) => resolve({ code, stderr }));
  });
  t.equal(bad.code, 1);
  t.match(bad.stderr, /caprl run-batch: error: .*line 1: "method" must be a string/);
});
