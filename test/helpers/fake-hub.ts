// A local stand-in for the Hugging Face Hub on 127.0.0.1, speaking the protocol huggingface_hub
// (and src/hub/hub.ts) use:
//   GET  /api/models/{org}/{name}/revision/{rev}   {id, sha, siblings: [{rfilename}]}
//   HEAD/GET /{org}/{name}/resolve/{rev}/{file}      small files: 200, ETag = git blob oid;
//        LFS files (*.safetensors): 302 to a CDN on ANOTHER origin, X-Linked-Etag = sha256,
//        X-Linked-Size; every answer carries X-Repo-Commit
//   GET  {cdn}/blobs/{sha256}                         the bytes, with Range support (206)
// Knobs to break things: cut the connection after N bytes (once), serve corrupted bytes, demand a
// token. Every request is logged (method, path, range, whether it carried Authorization).
import { createHash } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';

export interface HubRequest {
  server: 'api' | 'cdn';
  method: string;
  path: string;
  range?: string;
  auth: boolean;
}

export interface FakeHub {
  endpoint: string;
  log: HubRequest[];
  /** Files (by name) whose next CDN GET is cut after this many bytes. */
  cutOnce: Map<string, number>;
  /** Files served with one byte flipped (the advertised sha256 stays the real one). */
  corrupt: Set<string>;
  /** Commit of a repo's main branch. */
  commitOf(repo: string): string;
  close(): Promise<void>;
}

interface RepoFile {
  name: string;
  data: Buffer;
  lfs: boolean;
  etag: string;
}

const gitOid = (b: Buffer) => createHash('sha1').update(`blob ${b.length}\0`).update(b).digest('hex');
const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** Serve each repo id from a folder (plus a README.md and .gitattributes, which clients should skip). */
export async function startFakeHub(repos: Record<string, string>, opts: { token?: string } = {}): Promise<FakeHub> {
  const table = new Map<string, { commit: string; files: Map<string, RepoFile> }>();
  for (const [id, dir] of Object.entries(repos)) {
    const files = new Map<string, RepoFile>();
    const add = (name: string, data: Buffer) => {
      const lfs = name.endsWith('.safetensors');
      files.set(name, { name, data, lfs, etag: lfs ? sha256(data) : gitOid(data) });
    };
    for (const f of readdirSync(dir).sort()) if (statSync(join(dir, f)).isFile()) add(f, readFileSync(join(dir, f)));
    add('README.md', Buffer.from(`# ${id}\n`));
    add('.gitattributes', Buffer.from('*.safetensors filter=lfs diff=lfs merge=lfs -text\n'));
    const commit = createHash('sha1').update(id).update([...files.values()].map((f) => f.etag).join()).digest('hex');
    table.set(id, { commit, files });
  }
  const blobs = new Map<string, RepoFile>();
  for (const r of table.values()) for (const f of r.files.values()) if (f.lfs) blobs.set(f.etag, f);

  const log: HubRequest[] = [];
  const cutOnce = new Map<string, number>();
  const corrupt = new Set<string>();
  let cdnBase = '';

  const record = (server: HubRequest['server'], req: IncomingMessage) =>
    log.push({ server, method: req.method!, path: decodeURIComponent(req.url!.split('?')[0]), range: req.headers.range, auth: req.headers.authorization !== undefined });

  const api = createServer((req: IncomingMessage, res: ServerResponse) => {
    record('api', req);
    const url = new URL(req.url!, 'http://x');
    if (opts.token && req.headers.authorization !== `Bearer ${opts.token}`) {
      res.writeHead(401, { 'x-error-code': 'RepoNotFound', 'x-error-message': 'Invalid credentials in Authorization header' }).end();
      return;
    }
    let m = /^\/api\/models\/([^/]+\/[^/]+)\/revision\/([^/]+)$/.exec(url.pathname);
    if (m && req.method === 'GET') {
      const repo = table.get(m[1]);
      const rev = decodeURIComponent(m[2]);
      if (!repo) return void res.writeHead(404, { 'x-error-code': 'RepoNotFound' }).end();
      if (rev !== 'main' && rev !== repo.commit) return void res.writeHead(404, { 'x-error-code': 'RevisionNotFound', 'x-error-message': `Invalid rev id: ${rev}` }).end();
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ id: m[1], sha: repo.commit, siblings: [...repo.files.keys()].map((rfilename) => ({ rfilename })) }));
      return;
    }
    m = /^\/([^/]+\/[^/]+)\/resolve\/([^/]+)\/(.+)$/.exec(url.pathname);
    if (m && (req.method === 'GET' || req.method === 'HEAD')) {
      const repo = table.get(m[1]);
      const rev = decodeURIComponent(m[2]);
      const f = repo?.files.get(decodeURIComponent(m[3]));
      if (!repo || (rev !== 'main' && rev !== repo.commit)) return void res.writeHead(404, { 'x-error-code': 'RevisionNotFound' }).end();
      if (!f) return void res.writeHead(404, { 'x-error-code': 'EntryNotFound' }).end();
      if (f.lfs) {
        res.writeHead(302, {
          location: `${cdnBase}/blobs/${f.etag}?name=${encodeURIComponent(f.name)}`,
          'x-repo-commit': repo.commit,
          'x-linked-etag': `"${f.etag}"`,
          'x-linked-size': String(f.data.length),
          etag: `"${gitOid(Buffer.from(f.etag))}"`,
          'content-length': '0',
        }).end();
        return;
      }
      res.writeHead(200, { etag: `"${f.etag}"`, 'x-repo-commit': repo.commit, 'content-length': String(f.data.length) });
      res.end(req.method === 'HEAD' ? undefined : f.data);
      return;
    }
    res.writeHead(404).end();
  });

  const cdn = createServer((req: IncomingMessage, res: ServerResponse) => {
    record('cdn', req);
    const m = /^\/blobs\/([0-9a-f]{64})$/.exec(new URL(req.url!, 'http://x').pathname);
    const f = m ? blobs.get(m[1]) : undefined;
    if (!f || req.method !== 'GET') return void res.writeHead(404).end();
    let data = f.data;
    if (corrupt.has(f.name)) {
      data = Buffer.from(data);
      data[data.length >> 1] ^= 0xff;
    }
    let start = 0;
    const r = /^bytes=(\d+)-$/.exec(req.headers.range ?? '');
    if (r) {
      start = Number(r[1]);
      if (start >= data.length) return void res.writeHead(416, { 'content-range': `bytes */${data.length}` }).end();
    }
    const body = data.subarray(start);
    res.writeHead(r ? 206 : 200, {
      'content-length': String(body.length),
      'accept-ranges': 'bytes',
      ...(r ? { 'content-range': `bytes ${start}-${data.length - 1}/${data.length}` } : {}),
    });
    const cut = cutOnce.get(f.name);
    if (cut !== undefined && cut < body.length) {
      cutOnce.delete(f.name);
      res.write(body.subarray(0, cut), () => setTimeout(() => res.socket?.destroy(), 20));
      return;
    }
    res.end(body);
  });

  const listen = (s: Server) => new Promise<number>((resolve) => s.listen(0, '127.0.0.1', () => resolve((s.address() as { port: number }).port)));
  const apiPort = await listen(api);
  cdnBase = `http://127.0.0.1:${await listen(cdn)}`;
  const close = (s: Server) => new Promise<void>((resolve) => {
    s.closeAllConnections();
    s.close(() => resolve());
  });
  return {
    endpoint: `http://127.0.0.1:${apiPort}`,
    log,
    cutOnce,
    corrupt,
    commitOf: (repo) => table.get(repo)!.commit,
    close: async () => {
      await Promise.all([close(api), close(cdn)]);
    },
  };
}
