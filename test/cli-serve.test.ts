// `caprl serve` as users run it: a child process on the tiny model, found through its startup
// log line, answering the openai client, and exiting 0 on SIGINT / SIGTERM.
import t from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';
import OpenAI from 'openai';
import { tinyModel } from './helpers/models.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const bin = path.join(root, 'bin', 'caprl.js');

interface Running {
  child: ChildProcess;
  baseURL: string;
  exited: Promise<number | null>;
  output: string[];
}

async function serve(args: string[]): Promise<Running> {
  const child = spawn(process.execPath, [bin, 'serve', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  const output: string[] = [];
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  createInterface({ input: child.stderr! }).on('line', (l) => output.push(l));
  const baseURL = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no startup line:\n${output.join('\n')}`)), 60_000);
    createInterface({ input: child.stdout! }).on('line', (l) => {
      output.push(l);
      const m = /serving .* on (http:\/\/[^ ]+\/v1)/.exec(l);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]!);
      }
    });
    void exited.then((code) => reject(new Error(`exited ${code} before listening:\n${output.join('\n')}`)));
  });
  return { child, baseURL, exited, output };
}

t.test('caprl serve MODEL --mmproj P --served-model-name caprl', async (t) => {
  const { model, mmproj } = await tinyModel();
  const s = await serve([model, '--mmproj', mmproj, '--host', '127.0.0.1', '--port', '0', '--served-model-name', 'caprl',
    '--max_model_len=2048', '--max-num-seqs', '4', '--threads', '2', '--gpu-memory-utilization', '0.5']);
  t.teardown(() => { if (s.child.exitCode === null) s.child.kill('SIGKILL'); });
  const client = new OpenAI({ baseURL: s.baseURL, apiKey: 'x', maxRetries: 0 });
  const models = await client.models.list();
  t.same(models.data.map((m) => m.id), ['caprl']);
  t.match(models.data[0], { max_model_len: 2048 });
  const r = await client.chat.completions.create({ model: 'caprl', messages: [{ role: 'user', content: 'hi' }], max_tokens: 3 });
  t.equal(r.usage!.completion_tokens <= 3, true);
  s.child.kill('SIGINT');
  t.equal(await s.exited, 0, 'SIGINT: clean exit');
  t.ok(s.output.some((l) => /shut down/.test(l)));
  t.ok(s.output.some((l) => /KV cache: 32768 tokens, .* on CPU .* sized by a token count/.test(l)), 'no GPU: the KV cache in tokens');
  t.ok(s.output.some((l) => /--gpu-memory-utilization has no effect here: no GPU holds the KV cache/.test(l)));
});

t.test('SIGTERM, and --model given as a flag', async (t) => {
  const { model } = await tinyModel();
  const s = await serve(['--model', model, '--host', '127.0.0.1', '--port', '0', '--kv-cache-memory-bytes', '5242880']);
  const client = new OpenAI({ baseURL: s.baseURL, apiKey: 'x', maxRetries: 0 });
  t.same((await client.models.list()).data.map((m) => m.id), [model], 'served name defaults to the model path');
  s.child.kill('SIGTERM');
  t.equal(await s.exited, 0);
  t.ok(s.output.some((l) => /KV cache: 10240 tokens, .* sized by --kv-cache-memory-bytes/.test(l)), '5 MiB of KV cache: 10240 tokens of 512 bytes');
  t.ok(s.output.some((l) => /8192, 16 seqs \(as the KV cache holds\);/.test(l)), 'no --max-num-seqs: 16, the fewest (the cache holds one 8192-token request)');
});

t.test('no --max-num-seqs: as many sequences as the KV cache holds at --max-model-len', async (t) => {
  const { model } = await tinyModel();
  const s = await serve([model, '--host', '127.0.0.1', '--port', '0', '--threads', '2', '--max-model-len', '512', '--kv-cache-tokens', '20480']);
  t.teardown(() => { if (s.child.exitCode === null) s.child.kill('SIGKILL'); });
  t.ok(s.output.some((l) => /max_model_len 512, 40 seqs \(as the KV cache holds\);/.test(l)), '20480 / 512 = 40 sequences');
  t.ok(s.output.some((l) => /KV cache: 20480 tokens, .*a stream per sequence/.test(l)), 'each with a stream of its own');
  const client = new OpenAI({ baseURL: s.baseURL, apiKey: 'x', maxRetries: 0 });
  const messages = [{ role: 'user' as const, content: 'hi' }];
  const r = await client.chat.completions.create({ model, messages, max_tokens: 2, n: 40 });
  t.equal(r.choices.length, 40, 'n up to the 40 sequences');
  await t.rejects(client.chat.completions.create({ model, messages, max_tokens: 2, n: 41 }), /must be in \[1, 40\]/);
  s.child.kill('SIGTERM');
  t.equal(await s.exited, 0);
});

t.test('usage errors exit 2 naming the problem', async (t) => {
  const run = (args: string[]) => new Promise<{ code: number | null; err: string }>((resolve) => {
    const c = spawn(process.execPath, [bin, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    c.stderr!.on('data', (d: Buffer) => (err += d.toString()));
    c.on('exit', (code) => resolve({ code, err }));
  });
  let r = await run(['serve', '--no-such-flag']);
  t.equal(r.code, 2);
  t.match(r.err, /caprl serve: error: unrecognized argument: --no-such-flag/);
  r = await run(['serve', '/nonexistent/model.gguf']);
  t.equal(r.code, 2);
  t.match(r.err, /model file not found/);
  r = await run(['frobnicate']);
  t.equal(r.code, 2);
  t.match(r.err, /unknown command "frobnicate"/);
});
