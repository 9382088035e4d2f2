// Downloads from a local Hub (test/helpers/fake-hub.ts) into huggingface_hub's cache layout:
// layout and token handling, resume with Range after a cut connection (in one run and across
// runs), refusal of a corrupted file, cache reuse without fetching weights again, offline mode.
import t from 'tap';
import { createHash } from 'node:crypto';
import { existsSync, lstatSync, readFileSync, readdirSync, readlinkSync, statSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { HubClient, HubError, hubOptionsFromEnv, isRepoId, repoCacheDir, type HubOptions } from '../src/hub/hub.js';
import { classifyModel, resolveModel } from '../src/hub/model-source.js';
import { createProgress } from '../src/hub/progress.js';
import { startFakeHub, type FakeHub } from './helpers/fake-hub.js';
import { writeTinyHfFolder } from './helpers/hf-folders.js';

const REPO = 'test-org/CapRL-tiny';
const TOKEN = 'hf_test_token';
let root: string;
let src: string;
let hub: FakeHub;

t.before(async () => {
  root = await mkdtemp(join(tmpdir(), 'caprl-hub-'));
  src = await writeTinyHfFolder(join(root, 'src'));
  hub = await startFakeHub({ [REPO]: src }, { token: TOKEN });
});
t.teardown(async () => {
  await hub.close();
  await rm(root, { recursive: true, force: true });
});

let n = 0;
const client = (o: Partial<HubOptions> = {}) => new HubClient({
  endpoint: hub.endpoint, token: TOKEN, cacheDir: join(root, `cache-${++n}`), offline: false, attempts: 3, retryDelayMs: 10, ...o,
});
const sha256 = (p: string) => createHash('sha256').update(readFileSync(p)).digest('hex');
const weightGets = () => hub.log.filter((r) => r.server === 'cdn' && r.method === 'GET');

t.test('environment: HF_ENDPOINT, HF_TOKEN, HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE', async (t) => {
  const o = hubOptionsFromEnv({ HF_HOME: '/x/hf', HF_ENDPOINT: 'http://h:1/', HF_TOKEN: 'tok', HF_HUB_OFFLINE: '1' });
  t.match(o, { endpoint: 'http://h:1', token: 'tok', cacheDir: '/x/hf/hub', offline: true });
  t.equal(hubOptionsFromEnv({ HF_HOME: '/x/hf', HF_HUB_CACHE: '/y' }).cacheDir, '/y');
  t.equal(hubOptionsFromEnv({ HF_HOME: '/nonexistent' }).endpoint, 'https://huggingface.co');
  t.equal(hubOptionsFromEnv({ HF_HOME: '/nonexistent' }).offline, false);
  t.ok(isRepoId('internlm/CapRL-3B'));
  t.notOk(isRepoId('/abs/path'));
  t.notOk(isRepoId('a/b/c'));
  t.notOk(isRepoId('internlm--x/y'));
  t.equal(classifyModel('internlm/CapRL-3B'), 'hub');
  t.equal(classifyModel('models/missing.gguf'), 'missing', 'a .gguf path is never a repo id');
  t.equal(classifyModel(src), 'folder');
});

t.test('download: cache layout, symlinks, refs, token only to the Hub, only the files needed', async (t) => {
  const c = client();
  hub.log.length = 0;
  const snap = await c.snapshot(REPO, 'main');
  const commit = hub.commitOf(REPO);
  const repoDir = repoCacheDir(c.opts.cacheDir, REPO);
  t.equal(snap.dir, join(repoDir, 'snapshots', commit));
  t.equal(readFileSync(join(repoDir, 'refs', 'main'), 'utf8'), commit, 'refs/main holds the commit');
  const files = readdirSync(snap.dir).sort();
  t.same(files, readdirSync(src).sort(), 'every config/tokenizer/safetensors file, no README.md / .gitattributes');
  for (const f of files) {
    const p = join(snap.dir, f);
    t.ok(lstatSync(p).isSymbolicLink(), `${f} is a symlink`);
    t.match(readlinkSync(p), /^\.\.\/\.\.\/blobs\/[0-9a-f]{40,64}$/, `${f} -> ../../blobs/<etag>`);
    t.equal(sha256(p), sha256(join(src, f)), `${f} content`);
  }
  const shard = join(snap.dir, 'model-00001-of-00002.safetensors');
  t.equal(readlinkSync(shard), `../../blobs/${sha256(join(src, 'model-00001-of-00002.safetensors'))}`, 'LFS blob named by its sha256');
  t.ok(hub.log.filter((r) => r.server === 'api').every((r) => r.auth), 'every Hub request carries the token');
  t.ok(weightGets().length === 2 && weightGets().every((r) => !r.auth), 'the CDN gets the weights without the token');
  t.notOk(readdirSync(join(repoDir, 'blobs')).some((f) => f.endsWith('.incomplete')), 'no partial files left');
});

t.test('a connection cut mid-file is resumed with Range in the same run', async (t) => {
  const c = client();
  hub.log.length = 0;
  const size = statSync(join(src, 'model-00001-of-00002.safetensors')).size;
  hub.cutOnce.set('model-00001-of-00002.safetensors', 100_000);
  const logs: string[] = [];
  c.opts.log = (l) => logs.push(l);
  const snap = await c.snapshot(REPO, 'main');
  const gets = weightGets().filter((r) => r.path.endsWith(sha256(join(src, 'model-00001-of-00002.safetensors'))));
  t.same(gets.map((r) => r.range), [undefined, 'bytes=100000-'], 'second GET asks for the rest');
  t.ok(size > 100_000);
  t.equal(sha256(join(snap.dir, 'model-00001-of-00002.safetensors')), sha256(join(src, 'model-00001-of-00002.safetensors')));
  t.match(logs.join('\n'), /connection lost at byte 100000/);
});

t.test('an interrupted run leaves a .incomplete blob; the next run resumes it', async (t) => {
  const cacheDir = join(root, 'resume-across-runs');
  const file = 'model-00002-of-00002.safetensors';
  hub.cutOnce.set(file, 50_000);
  await t.rejects(client({ cacheDir, attempts: 1 }).snapshot(REPO, 'main'), /connection lost at byte 50000.*run again to resume/);
  const blobs = join(repoCacheDir(cacheDir, REPO), 'blobs');
  const partial = readdirSync(blobs).find((f) => f.endsWith('.incomplete'));
  t.ok(partial, 'partial blob kept');
  t.equal(statSync(join(blobs, partial!)).size, 50_000);
  hub.log.length = 0;
  const snap = await client({ cacheDir }).snapshot(REPO, 'main');
  t.same(weightGets().map((r) => r.range), ['bytes=50000-'], 'only the rest is fetched');
  t.equal(sha256(join(snap.dir, file)), sha256(join(src, file)), 'resumed file verifies');
  t.ok(snap.downloaded.includes(file) && !snap.downloaded.includes('model-00001-of-00002.safetensors'), 'files finished in the first run are not fetched again');
});

t.test('two downloads of the same repo at once: each blob fetched once', async (t) => {
  const cacheDir = join(root, 'concurrent');
  hub.log.length = 0;
  const [a, b] = await Promise.all([client({ cacheDir }).snapshot(REPO, 'main'), client({ cacheDir }).snapshot(REPO, 'main')]);
  t.equal(a.dir, b.dir);
  t.equal(weightGets().length, 2, 'two shards, two GETs');
  t.notOk(readdirSync(join(repoCacheDir(cacheDir, REPO), 'blobs')).some((f) => f.endsWith('.lock') || f.endsWith('.incomplete')), 'no lock or partial left');
  for (const f of readdirSync(src)) t.equal(sha256(join(a.dir, f)), sha256(join(src, f)), f);
});

t.test('a corrupted download is refused and not cached', async (t) => {
  const c = client();
  hub.corrupt.add('model-00001-of-00002.safetensors');
  t.teardown(() => hub.corrupt.clear());
  await t.rejects(c.snapshot(REPO, 'main'), new RegExp(`${REPO}: model-00001-of-00002\\.safetensors is corrupted: its sha256 is [0-9a-f]{64} but the Hub says ${sha256(join(src, 'model-00001-of-00002.safetensors'))}`));
  const blobs = readdirSync(join(repoCacheDir(c.opts.cacheDir, REPO), 'blobs'));
  t.notOk(blobs.includes(sha256(join(src, 'model-00001-of-00002.safetensors'))), 'no blob under the expected name');
  t.notOk(blobs.some((f) => f.endsWith('.incomplete')), 'partial file removed');
});

t.test('second run: cache reused, no weights fetched; offline mode; unreachable Hub', async (t) => {
  const cacheDir = join(root, 'reuse');
  await client({ cacheDir }).snapshot(REPO, 'main');
  hub.log.length = 0;
  const again = await client({ cacheDir }).snapshot(REPO, 'main');
  t.same(again.downloaded, []);
  t.same(hub.log.map((r) => `${r.server} ${r.method}`), ['api GET'], 'one model-info call, no HEAD, no weight GET');
  hub.log.length = 0;
  const off = await client({ cacheDir, offline: true }).snapshot(REPO, 'main');
  t.equal(off.dir, again.dir);
  t.equal(hub.log.length, 0, 'offline: no request at all');
  const byCommit = await client({ cacheDir, offline: true }).snapshot(REPO, hub.commitOf(REPO));
  t.equal(byCommit.dir, again.dir, 'a commit hash resolves offline too');
  await t.rejects(client({ offline: true }).snapshot(REPO, 'main'), /HF_HUB_OFFLINE is set and test-org\/CapRL-tiny \(revision main\) is not in the cache/);
  const logs: string[] = [];
  const down = await client({ cacheDir, endpoint: 'http://127.0.0.1:9', attempts: 1, log: (l) => logs.push(l) }).snapshot(REPO, 'main');
  t.equal(down.dir, again.dir, 'Hub unreachable: the cached snapshot is used');
  t.match(logs.join('\n'), /cannot reach http:\/\/127\.0\.0\.1:9 .*using the cached snapshot/);
});

t.test('errors from the Hub say what to do', async (t) => {
  await t.rejects(client({ token: undefined }).snapshot(REPO, 'main'), /test-org\/CapRL-tiny: access denied \(HTTP 401\): the repo is private or gated, set HF_TOKEN/);
  await t.rejects(client({ token: 'wrong' }).snapshot(REPO, 'main'), /HF_TOKEN has no access to this repo/);
  await t.rejects(client().snapshot('test-org/nope', 'main'), /test-org\/nope: not found on http:\/\/127\.0\.0\.1:\d+/);
  await t.rejects(client().snapshot(REPO, 'v9'), /test-org\/CapRL-tiny has no revision "v9"/);
  t.ok(new HubError('x') instanceof Error);
});

t.test('resolveModel: repo id -> download -> conversion, then everything cached', async (t) => {
  const env = { HF_ENDPOINT: hub.endpoint, HF_TOKEN: TOKEN, HF_HOME: join(root, 'hf-home'), CAPRL_CACHE: join(root, 'caprl-cache') };
  const err: string[] = [];
  const stderr = { write: (s: string) => err.push(s) };
  const a = await resolveModel(REPO, { env, stderr });
  t.equal(a.kind, 'hub');
  t.equal(a.conversion?.cached, false);
  t.ok(a.model.startsWith(join(root, 'caprl-cache', 'converted', 'test-org--CapRL-tiny-')), a.model);
  t.ok(existsSync(join(root, 'hf-home', 'hub', 'models--test-org--CapRL-tiny', 'refs', 'main')), 'downloaded into $HF_HOME/hub');
  t.match(err.join(''), /model-00001-of-00002\.safetensors: 100%/);
  t.match(err.join(''), /converting test-org\/CapRL-tiny to GGUF: 100%/);
  hub.log.length = 0;
  const b = await resolveModel(REPO, { env, stderr });
  t.equal(b.conversion?.cached, true, 'second start: converted files reused');
  t.equal(b.model, a.model);
  t.equal(weightGets().length, 0, 'second start: no weight download');
});

t.test('progress: a bar redrawn in place on a terminal, a line per 10% otherwise', async (t) => {
  const out: string[] = [];
  const tty = createProgress({ write: (s: string) => out.push(s), isTTY: true, columns: 100 }, 'model.safetensors', 1000);
  tty.update(500);
  tty.finish();
  t.match(out[0], /^\rmodel\.safetensors \[#{12}\.{12}\]  50% 500 B\/1\.0 kB/);
  t.ok(out.every((l) => l.startsWith('\r')) && out[out.length - 1].endsWith('\n'), 'carriage returns, one newline at the end');
  const lines: string[] = [];
  const plain = createProgress({ write: (s: string) => lines.push(s) }, 'f', 1000);
  for (let i = 0; i <= 1000; i += 50) plain.update(i);
  plain.finish();
  t.equal(lines.length, 11, '0%..90% and the final line');
  t.match(lines[lines.length - 1], /^f: 100% \(1\.0 kB of 1\.0 kB\)/);
  t.ok(lines.every((l) => !l.includes('\r')));
});
