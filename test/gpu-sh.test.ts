// bench/gpu.sh and its helpers: shell syntax, argument handling, and the --dry-run end to end on
// the CPU (tiny model, small counts; the carried-archive checks run only where .carry/ exists).
import t from 'tap';
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const run = promisify(execFile);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const script = (name: string) => path.join(root, 'bench', name);

t.test('bash -n on the bench scripts', async (t) => {
  for (const s of ['gpu.sh', 'pack-gpu.sh', 'build-llama-server.sh']) {
    await t.resolves(run('bash', ['-n', script(s)]), `bash -n bench/${s}`);
  }
});

t.test('gpu.sh: --help and unknown arguments', async (t) => {
  const { stdout } = await run('bash', [script('gpu.sh'), '--help']);
  t.match(stdout, /--dry-run/);
  const err = await run('bash', [script('gpu.sh'), '--nope']).catch((e: { code: number; stderr: string }) => e);
  t.equal((err as { code: number }).code, 2);
  t.match((err as { stderr: string }).stderr, /unknown argument --nope/);
});

const haveAddon = existsSync(path.join(root, 'build', 'Release', 'caprl_engine.node'));
const haveLlamaServer = existsSync(path.join(root, 'build', 'bin', 'llama-server')) || !!process.env.LLAMA_SERVER;
t.test('gpu.sh --dry-run end to end (tiny model, CPU)', {
  skip: haveAddon || haveLlamaServer ? false : 'neither the addon (build/Release/caprl_engine.node) nor llama-server is built',
  timeout: 300_000,
}, async (t) => {
  const work = mkdtempSync(path.join(os.tmpdir(), 'caprl-gpu-dry-'));
  t.teardown(() => rmSync(work, { recursive: true, force: true }));
  const out = path.join(work, 'out');
  const env = {
    ...process.env, WORK: work, OUT: out, SKIP_GPU_CHECK: '1',
    BENCH_CONCURRENCY: '1,2', BENCH_REQUESTS: '2', BENCH_TOKENS: '8', BENCH_SIZES: '448x448',
  };
  const res = await run('bash', [script('gpu.sh'), '--dry-run'], { env, maxBuffer: 64 * 1024 * 1024 }).then(
    (r) => ({ code: 0, stdout: r.stdout }),
    (e: { code: number; stdout: string }) => ({ code: e.code, stdout: e.stdout }),
  );
  t.equal(res.code, 0, 'dry run exits 0');
  t.match(res.stdout, /== unpack/);
  t.match(res.stdout, /================ summary/);
  const files = readdirSync(out);
  t.ok(files.length <= 8, `at most 8 files in OUT (${files.join(', ')})`);
  for (const f of ['gpu.log', 'build.log', 'gpu-check.txt', 'bench-tiny-f16.json', 'bench-tiny-f16.md']) t.ok(files.includes(f), f);
  const rep = JSON.parse(readFileSync(path.join(out, 'bench-tiny-f16.json'), 'utf8')) as { levels: { server: string; completed: number; requests: number }[] };
  t.ok(rep.levels.length >= 2, 'levels ran');
  t.ok(rep.levels.every((l) => l.completed === l.requests), 'every request completed');
  if (haveAddon) {
    const servers = new Set(rep.levels.map((l) => l.server));
    t.ok(servers.has('caprl') && servers.has('caprl-vision'), `caprl with both vision encoders benchmarked (${[...servers].join(', ')})`);
    t.match(res.stdout, /KV cache: \d+ tokens, .* sized by --gpu-memory-utilization 0\.9/, 'the KV sizing step printed its choice');
    t.match(res.stdout, /\| mode \| logits \| llama\.cpp chain ms\/token \| direct ms\/token/, 'the sampler benchmark ran');
    t.match(res.stdout, /\| JPEG \| grid \| decode only \| sharp resize \| prepareImage/, 'the image prep benchmark ran');
    // Each caprl level carries what its /metrics said over the level; llama-server's none.
    const full = JSON.parse(readFileSync(path.join(out, 'bench-tiny-f16.json'), 'utf8')) as {
      levels: { server: string; completed: number; engine?: { requests: number; steps: number; prefillMs: number; seqsPerStep: number; imageEncodeMs: number } }[];
    };
    for (const l of full.levels) {
      if (l.server.startsWith('caprl')) {
        t.equal(l.engine?.requests, l.completed, `${l.server}: /metrics counted the level's requests`);
        t.ok(l.engine!.steps >= 8 && l.engine!.seqsPerStep > 0 && l.engine!.prefillMs > 0 && l.engine!.imageEncodeMs > 0,
          `${l.server}: steps ${l.engine!.steps}, ${l.engine!.seqsPerStep} seqs/step, prefill ${l.engine!.prefillMs} ms, encode ${l.engine!.imageEncodeMs} ms`);
      } else {
        t.equal(l.engine, undefined, `${l.server}: no caprl metrics`);
      }
    }
    const md = readFileSync(path.join(out, 'bench-tiny-f16.md'), 'utf8');
    t.match(md, /Where the time went/, 'the report has the per-level breakdown');
    t.match(md, /issue 8 targets, caprl-vision: .*TTFT p50 at c=1 \d+ ms/, 'and the issue 8 targets it measured');
    t.match(res.stdout, /================ summary[\s\S]*- issue 8 targets, caprl-vision/, 'which the summary repeats');
  }
  t.match(readFileSync(path.join(out, 'gpu.log'), 'utf8'), /\[gpu\.sh \d\d:\d\d:\d\d \+\s*\d+s\] == bench/, 'timestamped phases');
});
