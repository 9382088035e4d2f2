// Crash-safe JSONL output for long runs. Every finished record is appended as one whole line in
// one write() (looped only if the kernel takes fewer bytes), and the file is fsync'd at least
// every `fsyncIntervalMs` and on close: a crash loses in-flight work only, and can at worst
// leave one torn last line (power loss, disk full). Opening an existing file for a rerun reads
// it once (streaming, any size): the keys of its records are what is already done, a torn last
// line (no newline, or not JSON) is cut off, and records a rerun should redo (--retry-errors)
// can be dropped from the file (rewritten to a temp file, then renamed over it).
import { closeSync, fsyncSync, openSync, writeSync, promises as fsp } from 'node:fs';

export type JsonRecord = Record<string, unknown>;

export interface OpenJsonlOptions {
  /** The key of a record (its id); records without one are kept but not indexed. */
  key: (rec: JsonRecord) => string | undefined;
  /** Records to remove from the file, so that they count as not done (e.g. error records on --retry-errors). */
  drop?: (rec: JsonRecord) => boolean;
  /** Sees every record kept (in file order). */
  onRecord?: (rec: JsonRecord) => void;
  /** 'interval' (default): fsync at most every fsyncIntervalMs; 'always': after every line. */
  fsync?: 'always' | 'interval' | 'never';
  fsyncIntervalMs?: number;
}

export interface ResumeInfo {
  /** Keys of the records already in the file. */
  keys: Set<string>;
  /** Records kept. */
  records: number;
  /** Bytes of a torn last line that were cut off (0 if none). */
  tornBytes: number;
  /** Lines in the middle of the file that are not JSON objects (left as they are, counted as not done). */
  corruptLines: number;
  /** Records removed by `drop`. */
  dropped: number;
}

const CHUNK = 1 << 20;

interface ScannedLine {
  start: number;
  end: number; // offset of the "\n"
  rec: JsonRecord | null;
}

/** Calls `onLine` for each newline-terminated line; returns the file size and the end of the last complete line. */
async function scanLines(file: string, onLine: (l: ScannedLine) => void): Promise<{ size: number; completeEnd: number }> {
  const fh = await fsp.open(file, 'r');
  try {
    const buf = Buffer.allocUnsafe(CHUNK);
    let carry: Buffer[] = [];
    let carryStart = 0;
    let pos = 0;
    for (;;) {
      const { bytesRead } = await fh.read(buf, 0, CHUNK, pos);
      if (bytesRead === 0) break;
      let from = 0;
      for (;;) {
        const nl = buf.indexOf(0x0a, from);
        if (nl < 0 || nl >= bytesRead) break;
        const piece = buf.subarray(from, nl);
        const bytes = carry.length > 0 ? Buffer.concat([...carry, piece]) : piece;
        const start = carry.length > 0 ? carryStart : pos + from;
        carry = [];
        onLine({ start, end: pos + nl, rec: parseRecord(bytes) });
        from = nl + 1;
      }
      if (from < bytesRead) {
        if (carry.length === 0) carryStart = pos + from;
        carry.push(Buffer.from(buf.subarray(from, bytesRead)));
      }
      pos += bytesRead;
    }
    const tail = carry.reduce((n, b) => n + b.length, 0);
    return { size: pos, completeEnd: pos - tail };
  } finally {
    await fh.close();
  }
}

function parseRecord(bytes: Buffer): JsonRecord | null {
  if (bytes.length === 0) return null;
  try {
    const v: unknown = JSON.parse(bytes.toString('utf8'));
    return typeof v === 'object' && v !== null && !Array.isArray(v) ? (v as JsonRecord) : null;
  } catch {
    return null;
  }
}

/** An output file opened for appending, after its existing records were read. */
export class JsonlAppender {
  private fd: number | null;
  private lastSync = Date.now();
  private dirty = false;
  private written = 0;

  private constructor(readonly path: string, fd: number, private readonly opts: OpenJsonlOptions) {
    this.fd = fd;
  }

  /** Opens (creating if needed) `path`; repairs a torn last line and applies `drop` first. */
  static async open(path: string, opts: OpenJsonlOptions): Promise<{ appender: JsonlAppender; resume: ResumeInfo }> {
    const resume: ResumeInfo = { keys: new Set(), records: 0, tornBytes: 0, corruptLines: 0, dropped: 0 };
    let exists = true;
    try {
      await fsp.stat(path);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      exists = false;
    }
    if (exists) {
      let lastBad: ScannedLine | null = null;
      let lastLine: ScannedLine | null = null;
      const { size, completeEnd } = await scanLines(path, (l) => {
        if (l.end === l.start) return; // blank line
        if (lastBad) resume.corruptLines++; // a bad line followed by more lines: not the torn tail
        lastBad = null;
        lastLine = l;
        if (!l.rec) {
          lastBad = l;
          return;
        }
        if (opts.drop?.(l.rec)) {
          resume.dropped++;
          return;
        }
        resume.records++;
        const k = opts.key(l.rec);
        if (k !== undefined) resume.keys.add(k);
        opts.onRecord?.(l.rec);
      });
      // The torn tail: bytes after the last newline, plus a last complete line that is not JSON.
      let cut = completeEnd;
      if (lastBad !== null && lastLine === lastBad) cut = (lastBad as ScannedLine).start;
      if (cut < size) {
        resume.tornBytes = size - cut;
        await fsp.truncate(path, cut);
      }
      if (resume.dropped > 0) await rewriteWithout(path, opts.drop!);
    }
    const fd = openSync(path, 'a');
    return { appender: new JsonlAppender(path, fd, opts), resume };
  }

  /** Appends one record as one line (a single write of the whole line). */
  append(rec: JsonRecord): void {
    if (this.fd === null) throw new Error(`${this.path} is closed`);
    const buf = Buffer.from(`${JSON.stringify(rec)}\n`, 'utf8');
    let off = 0;
    while (off < buf.length) off += writeSync(this.fd, buf, off, buf.length - off);
    this.written++;
    this.dirty = true;
    const mode = this.opts.fsync ?? 'interval';
    if (mode === 'always' || (mode === 'interval' && Date.now() - this.lastSync >= (this.opts.fsyncIntervalMs ?? 1000))) {
      this.sync();
    }
  }

  /** Lines appended since open. */
  get appended(): number {
    return this.written;
  }

  sync(): void {
    if (this.fd === null || !this.dirty) return;
    fsyncSync(this.fd);
    this.dirty = false;
    this.lastSync = Date.now();
  }

  close(): void {
    if (this.fd === null) return;
    if ((this.opts.fsync ?? 'interval') !== 'never') this.sync();
    closeSync(this.fd);
    this.fd = null;
  }
}

/** Rewrites `path` keeping every line but the records `drop` matches (temp file + rename). */
async function rewriteWithout(path: string, drop: (rec: JsonRecord) => boolean): Promise<void> {
  const tmp = `${path}.rewrite-${process.pid}`;
  const out = await fsp.open(tmp, 'w');
  const src = await fsp.open(path, 'r');
  try {
    const pending: { start: number; end: number }[] = [];
    await scanLines(path, (l) => {
      if (l.rec && drop(l.rec)) return;
      pending.push({ start: l.start, end: l.end + 1 });
    });
    // Copy kept ranges, merging neighbours into large reads.
    let i = 0;
    while (i < pending.length) {
      const start = pending[i]!.start;
      let end = pending[i]!.end;
      i++;
      while (i < pending.length && pending[i]!.start === end && end - start < CHUNK) end = pending[i++]!.end;
      const b = Buffer.allocUnsafe(end - start);
      await src.read(b, 0, b.length, start);
      await out.write(b);
    }
    await out.sync();
  } finally {
    await out.close();
    await src.close();
  }
  await fsp.rename(tmp, path);
}

/** Reads every complete JSON object line of a file we wrote (skipping blank and broken lines, and a torn tail). */
export async function readJsonl(path: string, onRecord: (rec: JsonRecord, lineNo: number) => void): Promise<void> {
  let n = 0;
  await scanLines(path, (l) => {
    n++;
    if (l.rec) onRecord(l.rec, n);
  });
}
