// Done-when for the vllm serve drop-in: `caprl serve` started as a child process with exactly
// CapRL's `vllm serve` flags answers CapRL's two README client snippets unchanged (a remote
// image URL, served here from a loopback HTTP server, and a base64 local image), through the
// official `openai` client. Also: one start-up line per flag accepted without effect, --help,
// and the flags refused with a clear message.
import t from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import OpenAI from 'openai';
import { writeTinyHfFolder } from './helpers/hf-folders.js';
import { startImageServer } from './helpers/image-server.js';
import { tinyModel } from './helpers/models.js';
import { pngDataUri } from './helpers/server.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const bin = path.join(root, 'bin', 'caprl.js');

async function freePort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((resolve) => srv.listen(0, '127.0.0.1', resolve));
  const { port } = srv.address() as net.AddressInfo;
  await new Promise<void>((resolve) => srv.close(() => resolve()));
  return port;
}

interface Running {
  child: ChildProcess;
  exited: Promise<number | null>;
  output: string[];
}

async function serve(args: string[], env: NodeJS.ProcessEnv = {}): Promise<Running> {
  const child = spawn(process.execPath, [bin, 'serve', ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  const output: string[] = [];
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  createInterface({ input: child.stderr! }).on('line', (l) => output.push(l));
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no startup line:\n${output.join('\n')}`)), 60_000);
    createInterface({ input: child.stdout! }).on('line', (l) => {
      output.push(l);
      if (/serving .* on http:\/\//.test(l)) {
        clearTimeout(timer);
        resolve();
      }
    });
    void exited.then((code) => reject(new Error(`exited ${code} before listening:\n${output.join('\n')}`)));
  });
  return { child, exited, output };
}

function run(args: string[]): Promise<{ code: number | null; out: string; err: string }> {
  return new Promise((resolve) => {
    const c = spawn(process.execPath, [bin, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    c.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    c.stderr!.on('data', (d: Buffer) => (err += d.toString()));
    c.on('exit', (code) => resolve({ code, out, err }));
  });
}

t.test("CapRL's README, unchanged, against caprl serve with vllm serve's flags", async (t) => {
  // The model as CapRL's users have it: a Hugging Face folder (tiny weights), converted on start.
  const work = mkdtempSync(path.join(os.tmpdir(), 'caprl-vllm-cli-'));
  t.teardown(() => rmSync(work, { recursive: true, force: true }));
  const folder = await writeTinyHfFolder(path.join(work, 'CapRL-tiny'));
  const port = await freePort();
  // Exactly CapRL's `vllm serve` line, with caprl in front (host: loopback, for a test).
  const s = await serve([folder,
    '--trust-remote-code', '--tensor-parallel-size=1', '--pipeline-parallel-size=1', '--gpu_memory_utilization=0.95',
    '--served-model-name=caprl', '--port', String(port), '--host', '127.0.0.1'],
    // The converted model's cache, and the image server below is on loopback, refused by default
    // (url-guard.ts): both set through the environment, so the command line stays vLLM's own.
    { CAPRL_CACHE: path.join(work, 'cache'), CAPRL_ALLOW_PRIVATE_IMAGE_URLS: '1' });
  t.teardown(() => {
    if (s.child.exitCode === null) s.child.kill('SIGKILL');
  });

  // The README's client, as in Python: api_key "EMPTY", base_url http://localhost:PORT/v1.
  const openai_api_key = 'EMPTY';
  const openai_api_base = `http://127.0.0.1:${port}/v1`;
  const client = new OpenAI({ apiKey: openai_api_key, baseURL: openai_api_base, maxRetries: 0 });
  const max_tokens = 16;

  // Snippet 1: a remote image URL (the README's points at modelscope; here a loopback server).
  const imageUri = await pngDataUri(320, 240);
  const png = Buffer.from(imageUri.slice(imageUri.indexOf(',') + 1), 'base64');
  const srv = await startImageServer(png);
  t.teardown(() => srv.close());
  const remote = await client.chat.completions.create({
    model: 'caprl',
    messages: [
      { role: 'system', content: 'You are a helpful assistant.' },
      {
        role: 'user',
        content: [
          { type: 'image_url', image_url: { url: `${srv.url}/img.png` } },
          { type: 'text', text: 'What is the text in the illustrate?' },
        ],
      },
    ],
    temperature: 1.0,
    max_tokens,
    top_p: 1.0,
    // extra_body={"repetition_penalty": 1.0}
    ...{ repetition_penalty: 1.0 },
  });
  t.equal(remote.object, 'chat.completion');
  t.equal(remote.model, 'caprl');
  t.equal(remote.choices[0]!.message.role, 'assistant');
  t.type(remote.choices[0]!.message.content, 'string');
  t.ok(remote.usage!.completion_tokens <= max_tokens);
  t.ok(remote.usage!.prompt_tokens > 88, `the 320x240 image's 88 tokens are in the prompt (${remote.usage!.prompt_tokens})`);
  t.ok(srv.hits.includes('/img.png'), 'the server fetched the URL');

  // Snippet 2: a base64-encoded local image, "data:image;base64,...".
  const dir = mkdtempSync(path.join(os.tmpdir(), 'caprl-readme-'));
  const image_path = path.join(dir, 'image.png');
  writeFileSync(image_path, png);
  const encoded_image_text = readFileSync(image_path).toString('base64');
  const base64_qwen = `data:image;base64,${encoded_image_text}`;
  const local = await client.chat.completions.create({
    model: 'caprl',
    messages: [
      { role: 'system', content: 'You are a helpful assistant.' },
      {
        role: 'user',
        content: [
          { type: 'image_url', image_url: { url: base64_qwen } },
          { type: 'text', text: 'What is the text in the illustrate?' },
        ],
      },
    ],
    temperature: 1.0,
    max_tokens,
    top_p: 1.0,
    ...{ repetition_penalty: 1.0 },
  });
  t.equal(local.choices[0]!.message.role, 'assistant');
  t.equal(local.usage!.prompt_tokens, remote.usage!.prompt_tokens, 'same image, same prompt, by URL or inline');

  // The flags vLLM has and caprl accepts without effect: one start-up line each.
  const noted = (re: RegExp) => s.output.filter((l) => re.test(l)).length;
  t.equal(noted(/--gpu-memory-utilization has no effect here: no GPU holds the KV cache/), 1, 'a CPU build: vLLM ignores the share there too');
  t.equal(noted(/--trust-remote-code is accepted but has no effect/), 1);
  t.equal(noted(/--tensor-parallel-size|--pipeline-parallel-size/), 0, 'parallel sizes of 1 are simply right');

  s.child.kill('SIGTERM');
  t.equal(await s.exited, 0);
});

t.test('--api-key and VLLM_API_KEY on the real process', async (t) => {
  const { model } = await tinyModel();
  const port = await freePort();
  const s = await serve([model, '--port', String(port), '--host', '127.0.0.1', '--served-model-name', 'caprl', '--threads', '2'], { VLLM_API_KEY: 'from-env' });
  t.teardown(() => {
    if (s.child.exitCode === null) s.child.kill('SIGKILL');
  });
  const base = `http://127.0.0.1:${port}`;
  const denied = new OpenAI({ apiKey: 'EMPTY', baseURL: `${base}/v1`, maxRetries: 0 });
  const err = await denied.models.list().then(() => null, (e: unknown) => e);
  t.ok(err instanceof OpenAI.AuthenticationError, 'the client sees an AuthenticationError');
  t.equal((err as { status?: number }).status, 401);
  const ok = new OpenAI({ apiKey: 'from-env', baseURL: `${base}/v1`, maxRetries: 0 });
  t.same((await ok.models.list()).data.map((m) => m.id), ['caprl']);
  t.equal((await fetch(`${base}/health`)).status, 200);
  s.child.kill('SIGINT');
  t.equal(await s.exited, 0);
});

t.test('--help lists the vLLM flags; parallelism above 1 and unknown flags are refused by name', async (t) => {
  const help = await run(['serve', '--help']);
  t.equal(help.code, 0);
  for (const f of ['--api-key', '--gpu-memory-utilization', '--tensor-parallel-size', '--pipeline-parallel-size', '--trust-remote-code',
    '--limit-mm-per-prompt', '--mm-processor-kwargs', '--allowed-local-media-path', '--enable-prefix-caching', '--disable-log-requests']) {
    t.match(help.out, f, f);
  }
  const { model } = await tinyModel();
  let r = await run(['serve', model, '--tensor-parallel-size=2']);
  t.equal(r.code, 2);
  t.match(r.err, /caprl serve: error: argument --tensor-parallel-size: only 1 is supported, got 2/);
  r = await run(['serve', model, '--pipeline_parallel_size', '2']);
  t.equal(r.code, 2);
  t.match(r.err, /--pipeline-parallel-size: only 1 is supported/);
  r = await run(['serve', model, '--speculative-config', '{}']);
  t.equal(r.code, 2);
  t.match(r.err, /unrecognized argument: --speculative-config/);
  r = await run(['serve', model, '--limit-mm-per-prompt', '{"image": many}']);
  t.equal(r.code, 2);
  t.match(r.err, /--limit-mm-per-prompt: invalid JSON/);
});
