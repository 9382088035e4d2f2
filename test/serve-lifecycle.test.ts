// `caprl serve` as a process: the operations flags reach the server (/metrics, 429 with
// --max-waiting-requests, 504 with --request-timeout), and SIGTERM lets a running request finish
// within --shutdown-timeout, or cancels it after that, and exits 0 either way.
import t from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { tinyModel } from './helpers/models.js';
import { parseProm } from './helpers/prom.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const bin = path.join(root, 'bin', 'caprl.js');

interface Running {
  child: ChildProcess;
  url: string;
  exited: Promise<number | null>;
  output: string[];
}

async function serve(args: string[]): Promise<Running> {
  const { model, mmproj } = await tinyModel();
  const child = spawn(process.execPath, [bin, 'serve', model, '--mmproj', mmproj, '--host', '127.0.0.1', '--port', '0',
    '--served-model-name', 'caprl', '--threads', '1', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  const output: string[] = [];
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  createInterface({ input: child.stderr! }).on('line', (l) => output.push(l));
  const url = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no startup line:\n${output.join('\n')}`)), 60_000);
    createInterface({ input: child.stdout! }).on('line', (l) => {
      output.push(l);
      const m = /serving .* on (http:\/\/[^ ]+)\/v1/.exec(l);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]!);
      }
    });
    void exited.then((code) => reject(new Error(`exited ${code} before listening:\n${output.join('\n')}`)));
  });
  return { child, url, exited, output };
}

const body = (tokens: number, stream: boolean) => JSON.stringify({
  model: 'caprl', messages: [{ role: 'user', content: 'Go on.' }], max_tokens: tokens, ignore_eos: true, temperature: 0, stream,
});

const post = (url: string, b: string) =>
  fetch(`${url}/v1/chat/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: b });

/** Reads an SSE response: resolves with its events once the first content chunk arrived, and their end. */
async function openStream(url: string, tokens: number): Promise<{ all: Promise<string[]> }> {
  const res = await post(url, body(tokens, true));
  const reader = res.body!.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  while (!/"content":"[^"]/.test(buf)) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
  }
  const all = (async () => {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
    }
    return buf.split('\n\n').filter(Boolean);
  })();
  return { all };
}

t.test('operations flags reach the server', async (t) => {
  const s = await serve(['--max-model-len', '4000', '--max-num-seqs', '1', '--max-waiting-requests', '0', '--request-timeout', '0.3']);
  t.teardown(() => { if (s.child.exitCode === null) s.child.kill('SIGKILL'); });
  const m = parseProm(await (await fetch(`${s.url}/metrics`)).text());
  t.ok(m.has('vllm:num_requests_running'));
  t.ok(m.samples.some((x) => x.labels.model_name === 'caprl'), 'model_name is the served name');
  t.ok(m.has('process_resident_memory_bytes'));
  // One place (1 running + 0 waiting): a second concurrent request is refused; the first times out.
  const [a, b] = await Promise.all([post(s.url, body(3900, false)), post(s.url, body(3900, false))]);
  t.same([a.status, b.status].sort(), [429, 504]);
  s.child.kill('SIGTERM');
  t.equal(await s.exited, 0);
});

t.test('SIGTERM: a running stream finishes within --shutdown-timeout, then exit 0', async (t) => {
  const s = await serve(['--max-model-len', '1024', '--shutdown-timeout', '60']);
  t.teardown(() => { if (s.child.exitCode === null) s.child.kill('SIGKILL'); });
  const { all } = await openStream(s.url, 120);
  s.child.kill('SIGTERM');
  const events = await all;
  t.equal(events[events.length - 1], 'data: [DONE]');
  t.ok(events.some((e) => e.includes('"finish_reason":"length"')), 'finished normally');
  t.equal(await s.exited, 0);
  t.ok(s.output.some((l) => /shutting down/.test(l)));
});

t.test('SIGTERM: past --shutdown-timeout the stream is cancelled with an error event, then exit 0', async (t) => {
  const s = await serve(['--max-model-len', '4000', '--shutdown-timeout', '0.3']);
  t.teardown(() => { if (s.child.exitCode === null) s.child.kill('SIGKILL'); });
  const { all } = await openStream(s.url, 3900);
  const t0 = performance.now();
  s.child.kill('SIGTERM');
  const events = await all;
  t.equal(events[events.length - 1], 'data: [DONE]');
  t.match(events[events.length - 2], /aborted by the server/);
  t.equal(await s.exited, 0);
  t.ok(performance.now() - t0 < 10_000, 'exited soon after the grace period');
  t.ok(s.output.some((l) => /cancelling 1 request/.test(l)));
});
