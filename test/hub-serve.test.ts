// End to end, as users run it: `caprl serve <repo-id>` (a child process of bin/caprl.js) against a
// local Hub (HF_ENDPOINT) downloads, converts, starts and answers an image chat completion
// through the openai client; a second start is offline and reuses everything; a local folder
// serves the same way; broken inputs exit with one clear line.
import t from 'tap';
import { spawn } from 'node:child_process';
import { cp, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import OpenAI from 'openai';
import { startFakeHub, type FakeHub } from './helpers/fake-hub.js';
import { writeTinyHfFolder } from './helpers/hf-folders.js';
import { pngDataUri } from './helpers/server.js';

const bin = path.join(path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..'), 'bin', 'caprl.js');
const REPO = 'test-org/CapRL-tiny';
let root: string;
let folder: string;
let hub: FakeHub;

t.before(async () => {
  root = await mkdtemp(path.join(tmpdir(), 'caprl-hub-serve-'));
  folder = await writeTinyHfFolder(path.join(root, 'CapRL-tiny'));
  hub = await startFakeHub({ [REPO]: folder }, { token: 'hf_e2e' });
});
t.teardown(async () => {
  await hub.close();
  await rm(root, { recursive: true, force: true });
});

interface Child {
  code: Promise<number | null>;
  lines: string[];
  kill(sig: NodeJS.Signals): void;
}

/** `caprl serve ARGS` with `env`; resolves with its base URL once it listens, or its exit. */
function caprl(args: string[], env: Record<string, string>): { child: Child; ready: Promise<string | null> } {
  const p = spawn(process.execPath, [bin, 'serve', ...args], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  const lines: string[] = [];
  const code = new Promise<number | null>((res) => p.on('exit', (c) => res(c)));
  const ready = new Promise<string | null>((res) => {
    let buf = '';
    const onData = (d: Buffer) => {
      buf += d.toString();
      const parts = buf.split('\n');
      buf = parts.pop()!;
      for (const l of parts) {
        lines.push(l);
        const m = /serving .* on (http:\/\/[^ ]+\/v1)/.exec(l);
        if (m) res(m[1]);
      }
    };
    p.stdout!.on('data', onData);
    p.stderr!.on('data', onData);
    void code.then(() => res(null));
  });
  return { child: { code, lines, kill: (s) => p.kill(s) }, ready };
}

const baseEnv = () => ({ HF_ENDPOINT: hub.endpoint, HF_TOKEN: 'hf_e2e', HF_HOME: path.join(root, 'hf'), CAPRL_CACHE: path.join(root, 'caprl'), HF_HUB_OFFLINE: '' });
const common = ['--host', '127.0.0.1', '--port', '0', '--threads', '2', '--max-model-len', '2048', '--kv-cache-tokens', '4096', '--max-num-seqs', '2'];

async function describeImage(baseURL: string, model: string): Promise<OpenAI.Chat.Completions.ChatCompletion> {
  const client = new OpenAI({ baseURL, apiKey: 'x', maxRetries: 0, timeout: 120_000 });
  return client.chat.completions.create({
    model,
    messages: [{ role: 'user', content: [
      { type: 'image_url', image_url: { url: await pngDataUri(224, 224) } },
      { type: 'text', text: 'Please describe this image in detail' },
    ] }],
    temperature: 0,
    max_tokens: 8,
  });
}

t.test('caprl serve <repo-id>: download, convert, serve an image request; again offline from the cache', async (t) => {
  hub.log.length = 0;
  const first = caprl([REPO, ...common], baseEnv());
  t.teardown(() => first.child.kill('SIGKILL'));
  const url = await first.ready;
  t.ok(url, `listening (output:\n${first.child.lines.slice(-15).join('\n')})`);
  const r = await describeImage(url!, REPO);
  t.equal(r.model, REPO, 'served under the repo id, as vLLM does');
  t.equal(r.choices[0].finish_reason, 'length');
  t.ok(r.usage!.prompt_tokens > 64, `the image counted in the prompt (${r.usage!.prompt_tokens} tokens)`);
  t.ok((r.choices[0].message.content ?? '').length > 0, 'a caption');
  t.ok(hub.log.some((x) => x.server === 'cdn'), 'weights came from the Hub');
  t.match(first.child.lines.join('\n'), /converted to f16 GGUF/);
  first.child.kill('SIGINT');
  t.equal(await first.child.code, 0, 'clean exit');

  hub.log.length = 0;
  const second = caprl([REPO, ...common, '--served-model-name', 'caprl'], { ...baseEnv(), HF_HUB_OFFLINE: '1' });
  t.teardown(() => second.child.kill('SIGKILL'));
  const url2 = await second.ready;
  t.ok(url2, `second start listening (output:\n${second.child.lines.slice(-15).join('\n')})`);
  t.equal(hub.log.length, 0, 'offline: the Hub saw no request');
  t.match(second.child.lines.join('\n'), /from the cache/);
  t.match(second.child.lines.join('\n'), /using the converted f16 GGUF/);
  const r2 = await describeImage(url2!, 'caprl');
  t.equal(r2.choices[0].message.content, r.choices[0].message.content, 'same greedy caption');
  second.child.kill('SIGTERM');
  t.equal(await second.child.code, 0);
});

t.test('caprl serve <folder> --quantization q8_0', async (t) => {
  const s = caprl([folder, ...common, '--quantization', 'q8_0'], baseEnv());
  t.teardown(() => s.child.kill('SIGKILL'));
  const url = await s.ready;
  t.ok(url, `listening (output:\n${s.child.lines.slice(-15).join('\n')})`);
  const r = await describeImage(url!, folder);
  t.equal(r.model, folder);
  t.match(s.child.lines.join('\n'), /converted to q8_0 GGUF/);
  s.child.kill('SIGINT');
  t.equal(await s.child.code, 0);
});

t.test('bad inputs: exit code and one clear line', async (t) => {
  const broken = path.join(root, 'broken');
  await cp(folder, broken, { recursive: true });
  await writeFile(path.join(broken, 'config.json'), '{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}');
  const cases: Array<[string[], Record<string, string>, number, RegExp]> = [
    [[broken], {}, 1, /caprl serve: error: config\.json describes LlamaForCausalLM .*caprl-serve converts Qwen2\.5-VL checkpoints/],
    [[folder, '--quantization', 'q4_k_m'], {}, 2, /caprl serve: error: --quantization q4_k_m is not supported yet/],
    [[REPO, '--mmproj', folder], {}, 2, /caprl serve: error: --mmproj is for GGUF models only/],
    [['test-org/missing'], {}, 1, /caprl serve: error: test-org\/missing: not found on http:\/\/127\.0\.0\.1/],
    [[REPO], { HF_TOKEN: '' , HF_HOME: path.join(root, 'empty-home') }, 1, /access denied \(HTTP 401\).*set HF_TOKEN/],
    [[REPO], { HF_HUB_OFFLINE: '1', HF_HOME: path.join(root, 'empty-home') }, 1, /HF_HUB_OFFLINE is set and test-org\/CapRL-tiny \(revision main\) is not in the cache/],
  ];
  for (const [args, env, code, msg] of cases) {
    const s = caprl([...args, ...common], { ...baseEnv(), ...env });
    t.equal(await s.ready, null, `${args.join(' ')}: does not start`);
    t.equal(await s.child.code, code, `${args.join(' ')}: exit ${code}`);
    t.match(s.child.lines.join('\n'), msg);
    t.notMatch(s.child.lines.join('\n'), /\n\s+at /, 'no stack trace');
  }
});
