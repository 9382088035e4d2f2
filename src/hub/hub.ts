// Downloads a Hugging Face model repo (its config, tokenizer and safetensors files) into the
// cache layout huggingface_hub uses, so caches are shared both ways with Python tools:
//
//   $HF_HUB_CACHE (default $HF_HOME/hub, $HF_HOME default ~/.cache/huggingface)
//     models--{org}--{name}/
//       blobs/{etag}                 file contents (etag: sha256 for LFS files, git oid otherwise)
//       blobs/{etag}.incomplete      a download in progress: resumed with an HTTP Range request
//       snapshots/{commit}/{file}    relative symlinks to ../../blobs/{etag}
//       refs/{revision}              the commit a branch or tag pointed to when last resolved
//
// Protocol (what huggingface_hub does): GET {endpoint}/api/models/{repo}/revision/{revision}
// lists the files (siblings[].rfilename) and the commit (sha); HEAD {endpoint}/{repo}/resolve/
// {commit}/{file} gives X-Repo-Commit and X-Linked-Etag (LFS: the sha256) or ETag, without
// following the LFS redirect to the CDN; GET follows redirects (Authorization is only sent to
// the endpoint's origin). Every LFS file is checked against its sha256 before it enters the
// cache. HF_TOKEN authenticates (Bearer); HF_HUB_OFFLINE=1 uses the cache only.

import { createHash, type Hash } from 'node:crypto';
import { createReadStream, existsSync, readFileSync } from 'node:fs';
import { copyFile, mkdir, open, rename, rm, stat, symlink, unlink, writeFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { createProgress, formatBytes, type ProgressStream } from './progress.js';

export class HubError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'HubError';
  }
}

export interface HubOptions {
  /** https://huggingface.co, or HF_ENDPOINT */
  endpoint: string;
  token?: string;
  /** The hub cache folder (holds models--org--name/) */
  cacheDir: string;
  offline: boolean;
  /** Where progress bars / lines go (stderr); none when absent */
  progress?: ProgressStream;
  /** Notes for the user, one line each */
  log?: (line: string) => void;
  /** Attempts per file when the connection fails (each resumes where the last stopped). Default 5. */
  attempts?: number;
  /** Milliseconds before the first retry (doubling). Default 1000. */
  retryDelayMs?: number;
  /** Seconds without data before a request is abandoned (HF_HUB_DOWNLOAD_TIMEOUT). Default 30. */
  timeoutS?: number;
}

const truthy = (v: string | undefined) => v !== undefined && ['1', 'on', 'yes', 'true'].includes(v.trim().toLowerCase());

/** huggingface_hub's environment: HF_ENDPOINT, HF_TOKEN (or the token file), HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE. */
export function hubOptionsFromEnv(env: NodeJS.ProcessEnv = process.env): HubOptions {
  const hfHome = env.HF_HOME || join(env.XDG_CACHE_HOME || join(homedir(), '.cache'), 'huggingface');
  let token = env.HF_TOKEN || env.HUGGING_FACE_HUB_TOKEN || undefined;
  if (!token) {
    const tokenPath = env.HF_TOKEN_PATH || join(hfHome, 'token');
    try {
      token = readFileSync(tokenPath, 'utf8').trim() || undefined;
    } catch {
      // no token file: anonymous
    }
  }
  const timeout = Number(env.HF_HUB_DOWNLOAD_TIMEOUT);
  return {
    endpoint: (env.HF_ENDPOINT || 'https://huggingface.co').replace(/\/+$/, ''),
    token,
    cacheDir: env.HF_HUB_CACHE || env.HUGGINGFACE_HUB_CACHE || join(hfHome, 'hub'),
    offline: truthy(env.HF_HUB_OFFLINE) || truthy(env.TRANSFORMERS_OFFLINE),
    timeoutS: Number.isFinite(timeout) && timeout > 0 ? Math.max(timeout, 10) : undefined,
  };
}

/** org/name, as the Hub allows it (huggingface_hub's validate_repo_id, namespace required). */
export function isRepoId(s: string): boolean {
  return /^[\w.-]+\/[\w.-]+$/.test(s) && !s.includes('--') && !s.includes('..') && !/^[.-]|[.-]$/.test(s.split('/')[1]) && s.length <= 96;
}

export function repoCacheDir(cacheDir: string, repoId: string): string {
  return join(cacheDir, `models--${repoId.replace('/', '--')}`);
}

const isCommit = (rev: string) => /^[0-9a-f]{40}$/.test(rev);

/** The cached snapshot folder of a revision, if the cache has it. */
export function cachedSnapshot(cacheDir: string, repoId: string, revision: string): { dir: string; commit: string } | undefined {
  const repoDir = repoCacheDir(cacheDir, repoId);
  let commit = revision;
  if (!isCommit(revision)) {
    try {
      commit = readFileSync(join(repoDir, 'refs', revision), 'utf8').trim();
    } catch {
      return undefined;
    }
  }
  const dir = join(repoDir, 'snapshots', commit);
  return existsSync(join(dir, 'config.json')) ? { dir, commit } : undefined;
}

/** The files of a repo this project needs: top-level configs, tokenizer files, chat templates, safetensors. */
export function wantedFile(name: string): boolean {
  return /^[^/]+\.(json|safetensors|jinja)$/.test(name);
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function cleanEtag(e: string | null): string | undefined {
  return e ? e.replace(/^W\//, '').replace(/^"|"$/g, '') : undefined;
}

/** A network failure worth retrying (as opposed to an HTTP answer). */
class TransientError extends Error {}

export class HubClient {
  constructor(readonly opts: HubOptions) {}

  private headers(url: string, extra: Record<string, string> = {}): Record<string, string> {
    const h: Record<string, string> = { 'user-agent': 'caprl-serve', 'accept-encoding': 'identity', ...extra };
    // The token only goes to the endpoint itself, never to a CDN a redirect points at.
    if (this.opts.token && new URL(url).origin === new URL(this.opts.endpoint).origin) h.authorization = `Bearer ${this.opts.token}`;
    return h;
  }

  /** One request without redirects followed, under an inactivity timeout. */
  private async request(method: string, url: string, extra?: Record<string, string>, signal?: AbortSignal): Promise<Response> {
    try {
      return await fetch(url, { method, headers: this.headers(url, extra), redirect: 'manual', signal });
    } catch (e) {
      throw new TransientError(`${method} ${url}: ${(e as Error).cause instanceof Error ? ((e as Error).cause as Error).message : (e as Error).message}`, { cause: e });
    }
  }

  private async httpError(res: Response, what: string, repoId: string): Promise<HubError> {
    const code = res.headers.get('x-error-code');
    const msg = res.headers.get('x-error-message');
    if (code === 'GatedRepo') return new HubError(`${repoId} is gated: accept its conditions on the Hub, then set HF_TOKEN to a token of that account (${what})`);
    if (res.status === 401 || res.status === 403) {
      return new HubError(`${repoId}: access denied (HTTP ${res.status}): ${this.opts.token ? 'HF_TOKEN has no access to this repo' : 'the repo is private or gated, set HF_TOKEN'} (${what})`);
    }
    if (code === 'RevisionNotFound') return new HubError(`${repoId} has no revision ${JSON.stringify(what)} (${msg ?? 'revision not found'})`);
    if (res.status === 404) return new HubError(`${repoId}: not found on ${this.opts.endpoint} (${msg ?? what}); check the repo id, --revision, or HF_TOKEN for a private repo`);
    return new HubError(`${repoId}: HTTP ${res.status} ${res.statusText} for ${what}${msg ? `: ${msg}` : ''}`);
  }

  /** GET /api/models/{repo}/revision/{revision}: the commit and the file list. */
  async modelInfo(repoId: string, revision: string): Promise<{ commit: string; files: string[] }> {
    const url = `${this.opts.endpoint}/api/models/${repoId}/revision/${encodeURIComponent(revision)}`;
    const res = await this.withRetries(() => this.request('GET', url));
    if (!res.ok) throw await this.httpError(res, revision, repoId);
    const info = (await res.json()) as { sha?: unknown; siblings?: Array<{ rfilename?: unknown }> };
    if (typeof info.sha !== 'string' || !Array.isArray(info.siblings)) throw new HubError(`${repoId}: unexpected answer from ${url} (no sha / siblings)`);
    return { commit: info.sha, files: info.siblings.map((s) => s.rfilename).filter((f): f is string => typeof f === 'string') };
  }

  private resolveUrl(repoId: string, commit: string, file: string): string {
    return `${this.opts.endpoint}/${repoId}/resolve/${encodeURIComponent(commit)}/${file.split('/').map(encodeURIComponent).join('/')}`;
  }

  /** HEAD of a file: its etag (sha256 for LFS files), size and commit; relative redirects followed, the CDN one not. */
  async fileMetadata(repoId: string, commit: string, file: string): Promise<{ etag: string; lfs: boolean; size?: number; commit?: string; url: string }> {
    let url = this.resolveUrl(repoId, commit, file);
    for (let hop = 0; hop < 10; hop++) {
      const res = await this.withRetries(() => this.request('HEAD', url));
      const loc = res.headers.get('location');
      if (res.status >= 300 && res.status < 400 && loc && !/^[a-z][a-z0-9+.-]*:/i.test(loc) && !loc.startsWith('//')) {
        url = new URL(loc, url).toString(); // a renamed repo: same server
        continue;
      }
      if (res.status >= 400) throw await this.httpError(res, file, repoId);
      const linked = cleanEtag(res.headers.get('x-linked-etag'));
      const etag = linked ?? cleanEtag(res.headers.get('etag'));
      if (!etag) throw new HubError(`${repoId}: the Hub sent no ETag for ${file}; cannot cache it`);
      const size = Number(res.headers.get('x-linked-size') ?? res.headers.get('content-length') ?? NaN);
      return { etag, lfs: linked !== undefined, size: Number.isFinite(size) ? size : undefined, commit: res.headers.get('x-repo-commit') ?? undefined, url };
    }
    throw new HubError(`${repoId}: too many redirects for ${file}`);
  }

  private async withRetries<T>(f: (attempt: number) => Promise<T>): Promise<T> {
    const attempts = this.opts.attempts ?? 5;
    let delay = this.opts.retryDelayMs ?? 1000;
    for (let i = 1; ; i++) {
      try {
        return await f(i);
      } catch (e) {
        if (!(e instanceof TransientError) || i >= attempts) {
          if (e instanceof TransientError) throw new HubError(`${e.message} (gave up after ${attempts} attempts; run again to resume, or set HF_HUB_OFFLINE=1 to use the cache)`, { cause: e });
          throw e;
        }
        this.opts.log?.(`${e.message}; retrying in ${(delay / 1000).toFixed(1)}s`);
        await sleep(delay);
        delay *= 2;
      }
    }
  }

  /**
   * GET `url` (redirects followed) into `dest`, resuming from its current size with a Range
   * request. `hash` has seen the bytes already in `dest`. Returns the final size.
   */
  private async fetchInto(url: string, dest: string, hash: { h: Hash }, onBytes: (n: number) => void, what: string, repoId: string): Promise<number> {
    let have = existsSync(dest) ? (await stat(dest)).size : 0;
    const timeoutMs = (this.opts.timeoutS ?? 30) * 1000;
    const ctl = new AbortController();
    let timer: NodeJS.Timeout | undefined;
    const arm = () => {
      clearTimeout(timer);
      timer = setTimeout(() => ctl.abort(new Error(`no data for ${timeoutMs / 1000}s`)), timeoutMs);
    };
    arm();
    try {
      let res: Response | undefined;
      let u = url;
      for (let hop = 0; hop < 10; hop++) {
        res = await this.request('GET', u, have > 0 ? { range: `bytes=${have}-` } : {}, ctl.signal);
        const loc = res.headers.get('location');
        if (res.status >= 300 && res.status < 400 && loc) {
          u = new URL(loc, u).toString();
          continue;
        }
        break;
      }
      if (!res || (res.status >= 300 && res.status < 400)) throw new HubError(`${repoId}: too many redirects for ${what}`);
      if (res.status === 416 && have > 0) {
        // Nothing left to fetch (or a bad partial): let the size/hash check decide.
        await res.body?.cancel();
        return have;
      }
      if (res.status >= 500) throw new TransientError(`GET ${what}: HTTP ${res.status}`);
      if (!res.ok) throw await this.httpError(res, what, repoId);
      if (res.status === 200 && have > 0) {
        // The server ignored the Range: start over.
        have = 0;
        hash.h = createHash('sha256');
        await writeFile(dest, '');
      } else if (res.status === 206) {
        const start = Number(/bytes (\d+)-/.exec(res.headers.get('content-range') ?? '')?.[1]);
        if (start !== have) throw new HubError(`${repoId}: asked for ${what} from byte ${have}, got a range from ${start}`);
      }
      const fh = await open(dest, have > 0 ? 'a' : 'w');
      try {
        for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
          arm();
          await fh.write(chunk);
          hash.h.update(chunk);
          have += chunk.length;
          onBytes(have);
        }
      } catch (e) {
        throw new TransientError(`GET ${what}: connection lost at byte ${have} (${(e as Error).cause instanceof Error ? ((e as Error).cause as Error).message : (e as Error).message})`, { cause: e });
      } finally {
        await fh.close();
      }
      return have;
    } catch (e) {
      if (e instanceof HubError || e instanceof TransientError) throw e;
      throw new TransientError(`GET ${what}: ${(e as Error).message}`, { cause: e });
    } finally {
      clearTimeout(timer);
    }
  }

  /** Download one file of a commit into the cache (blob + snapshot symlink). Returns the snapshot path. */
  async downloadFile(repoId: string, commit: string, file: string): Promise<string> {
    const repoDir = repoCacheDir(this.opts.cacheDir, repoId);
    const link = join(repoDir, 'snapshots', commit, file);
    if (existsSync(link)) return link;
    const meta = await this.fileMetadata(repoId, commit, file);
    const blob = join(repoDir, 'blobs', meta.etag);
    await mkdir(dirname(blob), { recursive: true });
    const release = existsSync(blob) ? undefined : await this.lock(`${blob}.lock`, file);
    try {
      if (!existsSync(blob)) await this.fetchBlob(repoId, file, meta, blob);
    } finally {
      await release?.();
    }
    await mkdir(dirname(link), { recursive: true });
    await unlink(link).catch(() => {}); // a dangling link from an interrupted run
    try {
      await symlink(relative(dirname(link), blob), link);
    } catch {
      await copyFile(blob, link); // no symlinks here (as huggingface_hub does on such systems)
    }
    return link;
  }

  /**
   * One downloader per blob across processes (huggingface_hub uses a file lock too): the lock
   * file holds the owner's pid; a lock whose owner is gone is taken over.
   */
  private async lock(path: string, what: string): Promise<() => Promise<void>> {
    for (let waited = false; ; ) {
      try {
        const fh = await open(path, 'wx');
        await fh.write(String(process.pid));
        await fh.close();
        return () => rm(path, { force: true });
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      }
      let text: string;
      try {
        text = readFileSync(path, 'utf8');
      } catch {
        continue; // released meanwhile
      }
      const owner = Number(text || NaN);
      let alive = text === '' && !waited; // just created, pid not written yet: look again
      try {
        alive ||= Number.isInteger(owner) && (owner === process.pid || process.kill(owner, 0));
      } catch {
        // no such process: a stale lock
      }
      if (!alive) {
        await rm(path, { force: true });
        continue;
      }
      if (!waited) this.opts.log?.(`${what}: another process (pid ${owner}) is downloading it; waiting`);
      waited = true;
      await sleep(500);
    }
  }

  /** Download one blob (resuming its .incomplete file), check size and sha256, move it into place. */
  private async fetchBlob(repoId: string, file: string, meta: { etag: string; lfs: boolean; size?: number; url: string }, blob: string): Promise<void> {
    const partial = `${blob}.incomplete`;
    const hash = { h: createHash('sha256') };
    let size = existsSync(partial) ? (await stat(partial)).size : 0;
    if (size > 0) {
      // Resuming: the bytes already there count toward the checksum.
      for await (const c of createReadStream(partial)) hash.h.update(c as Buffer);
      this.opts.log?.(`${file}: resuming at ${formatBytes(size)}`);
    }
    const bar = this.opts.progress ? createProgress(this.opts.progress, file, meta.size ?? 0, size) : undefined;
    size = await this.withRetries(() => this.fetchInto(meta.url, partial, hash, (n) => bar?.update(n), file, repoId));
    bar?.finish();
    if (meta.size !== undefined && size !== meta.size) {
      await rm(partial, { force: true });
      throw new HubError(`${repoId}: ${file} downloaded ${size} bytes but the Hub said ${meta.size}; removed the partial file, run again`);
    }
    if (meta.lfs && /^[0-9a-f]{64}$/.test(meta.etag)) {
      const got = hash.h.digest('hex');
      if (got !== meta.etag) {
        await rm(partial, { force: true });
        throw new HubError(`${repoId}: ${file} is corrupted: its sha256 is ${got} but the Hub says ${meta.etag}; the download was deleted, run again`);
      }
    }
    await rename(partial, blob);
  }

  /**
   * The snapshot folder of `repoId` at `revision`, downloading what the cache lacks. With
   * HF_HUB_OFFLINE, or when the Hub cannot be reached, a cached snapshot is used if there is one.
   */
  async snapshot(repoId: string, revision: string, filter: (f: string) => boolean = wantedFile): Promise<{ dir: string; commit: string; downloaded: string[] }> {
    const cached = cachedSnapshot(this.opts.cacheDir, repoId, revision);
    if (this.opts.offline) {
      if (cached) return { ...cached, downloaded: [] };
      throw new HubError(`HF_HUB_OFFLINE is set and ${repoId} (revision ${revision}) is not in the cache at ${repoCacheDir(this.opts.cacheDir, repoId)}`);
    }
    let info: { commit: string; files: string[] };
    try {
      info = await this.modelInfo(repoId, revision);
    } catch (e) {
      if (cached && e instanceof HubError && e.cause instanceof TransientError) {
        this.opts.log?.(`cannot reach ${this.opts.endpoint} (${e.cause.message}); using the cached snapshot ${cached.commit}`);
        return { ...cached, downloaded: [] };
      }
      throw e;
    }
    const files = info.files.filter(filter);
    if (!files.some((f) => f.endsWith('.safetensors'))) {
      throw new HubError(`${repoId} (revision ${revision}) has no *.safetensors files (it has: ${info.files.slice(0, 12).join(', ')}${info.files.length > 12 ? ', ...' : ''}); a GGUF repo is served by downloading its .gguf files and passing them as MODEL --mmproj`);
    }
    const repoDir = repoCacheDir(this.opts.cacheDir, repoId);
    const downloaded: string[] = [];
    for (const f of files) {
      if (existsSync(join(repoDir, 'snapshots', info.commit, f))) continue;
      await this.downloadFile(repoId, info.commit, f);
      downloaded.push(f);
    }
    if (revision !== info.commit) {
      const ref = join(repoDir, 'refs', revision);
      await mkdir(dirname(ref), { recursive: true });
      await writeFile(ref, info.commit);
    }
    return { dir: join(repoDir, 'snapshots', info.commit), commit: info.commit, downloaded };
  }
}
