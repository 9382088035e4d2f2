// What `caprl caption` / `caprl eval` read: records with an id, an image and maybe a prompt.
//   - a folder: every .png/.jpg/.jpeg/.webp/.gif below it (recursive, sorted); id = the path
//     relative to the folder;
//   - a glob (data/**/*.jpg): the matching files; id = the path as matched;
//   - a JSONL (or .txt) list: one record per line, either a JSON object
//     {"image": "...", "id"?: ..., "prompt"?: "...", ...} (also "image_path", "path", "url",
//     "file", "image_url"), a JSON string, or a bare path/URL; id = "id" if given, else the image
//     as written (or the line number, for eval where one image may carry several questions).
//     Relative paths are resolved against --image-root, default the list's folder.
//   - a single image file.
// A line that cannot be used becomes a record with `error` set (an error record), never a stop.
import { createReadStream, promises as fs } from 'node:fs';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { sniffImageFormat, type ImageFormat } from '../images/decode-data-uri.js';
import { ImageInputError } from '../images/errors.js';
import { loadImageBytes } from '../images/image-source.js';
import { RecordError, errorMessage } from './errors.js';
import { expandGlob, isGlob, walkFiles } from './glob.js';

export interface InputRecord {
  id: string;
  /** The image as the input wrote it (a path, URL or data URI); copied to the output record. */
  image: string;
  /** Where to read it from: an absolute path, an http(s) URL or a data URI. */
  location: string;
  prompt?: string;
  /** 1-based line of a JSONL input. */
  line?: number;
  /** The JSON object of a JSONL line, as read (eval takes its question and answer from it). */
  fields?: Record<string, unknown>;
  /** Why the input line itself is unusable: the record is written as an error record. */
  error?: string;
}

export type InputKind = 'folder' | 'glob' | 'list' | 'image';

export interface InputSourceOptions {
  /** Folder relative image paths of a list are resolved against (default: the list's folder). */
  imageRoot?: string;
  /** Default id of a list record without "id": the image as written (default) or the line number. */
  idFrom?: 'image' | 'line';
  cwd?: string;
}

export interface InputSource {
  kind: InputKind;
  /** Every record in input order; can be iterated more than once (same records each time). */
  records(): AsyncGenerator<InputRecord>;
}

export const IMAGE_EXTENSIONS = ['.png', '.jpg', '.jpeg', '.webp', '.gif'] as const;
const LIST_EXTENSIONS = ['.jsonl', '.json', '.ndjson', '.txt', '.lst'];
const IMAGE_KEYS = ['image', 'image_path', 'path', 'url', 'file', 'image_url'] as const;

export class InputError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'InputError';
  }
}

function hasImageExtension(p: string): boolean {
  return (IMAGE_EXTENSIONS as readonly string[]).includes(path.extname(p).toLowerCase());
}

function isUrlLike(s: string): boolean {
  return /^(https?|data|file):/i.test(s);
}

/** Where an image reference points, given the folder relative paths start from. */
export function resolveImageLocation(image: string, root: string): string {
  if (/^file:/i.test(image)) return fileURLToPath(image);
  if (isUrlLike(image)) return image;
  return path.resolve(root, image);
}

/** Decides what INPUT is; throws InputError when it is none of the accepted forms. */
export async function openInputSource(input: string, opts: InputSourceOptions = {}): Promise<InputSource> {
  const cwd = opts.cwd ?? process.cwd();
  const abs = path.resolve(cwd, input);
  let st;
  try {
    st = await fs.stat(abs);
  } catch {
    st = null;
  }
  if (st?.isDirectory()) {
    return {
      kind: 'folder',
      async *records() {
        for await (const rel of walkFiles(abs)) {
          if (!hasImageExtension(rel)) continue;
          yield { id: rel, image: path.join(input, rel), location: path.join(abs, rel) };
        }
      },
    };
  }
  if (st?.isFile()) {
    const ext = path.extname(abs).toLowerCase();
    if (hasImageExtension(abs) && !LIST_EXTENSIONS.includes(ext)) {
      return { kind: 'image', async *records() { yield { id: input, image: input, location: abs }; } };
    }
    const root = path.resolve(cwd, opts.imageRoot ?? path.dirname(abs));
    return { kind: 'list', records: () => readList(abs, root, opts.idFrom ?? 'image') };
  }
  if (isGlob(input)) {
    return {
      kind: 'glob',
      async *records() {
        for await (const p of expandGlob(input, cwd)) {
          if (!hasImageExtension(p)) continue;
          yield { id: p, image: p, location: path.resolve(cwd, p) };
        }
      },
    };
  }
  throw new InputError(`input not found: ${input} (expected a folder, a glob, a JSONL list or an image file)`);
}

/** One list line -> a record (an error record when the line is unusable); null for a blank line. */
export function parseListLine(raw: string, lineNo: number, root: string, idFrom: 'image' | 'line'): InputRecord | null {
  const line = raw.trim();
  if (line === '') return null;
  const lineId = `line:${lineNo}`;
  const bad = (id: string, error: string, fields?: Record<string, unknown>): InputRecord =>
    ({ id, image: '', location: '', line: lineNo, error: `line ${lineNo}: ${error}`, fields });
  let image: unknown;
  let fields: Record<string, unknown> | undefined;
  if (line.startsWith('{') || line.startsWith('"')) {
    let v: unknown;
    try {
      v = JSON.parse(line);
    } catch (err) {
      return bad(lineId, `not valid JSON (${errorMessage(err)})`);
    }
    if (typeof v === 'string') {
      image = v;
    } else if (typeof v === 'object' && v !== null && !Array.isArray(v)) {
      fields = v as Record<string, unknown>;
      for (const k of IMAGE_KEYS) {
        let x = fields[k];
        if (k === 'image_url' && typeof x === 'object' && x !== null) x = (x as { url?: unknown }).url;
        if (typeof x === 'string' && x !== '') {
          image = x;
          break;
        }
      }
    } else {
      return bad(lineId, 'expected a JSON object or string');
    }
  } else {
    image = line;
  }
  const rawId = fields?.id;
  const givenId = typeof rawId === 'string' && rawId !== '' ? rawId : typeof rawId === 'number' ? String(rawId) : undefined;
  if (typeof image !== 'string' || image === '') {
    return bad(givenId ?? lineId, `no image (give one of ${IMAGE_KEYS.map((k) => `"${k}"`).join(', ')})`, fields);
  }
  const id = givenId ?? (idFrom === 'line' ? lineId : image);
  const prompt = typeof fields?.prompt === 'string' ? fields.prompt : undefined;
  let location: string;
  try {
    location = resolveImageLocation(image, root);
  } catch (err) {
    return { ...bad(id, `bad image reference: ${errorMessage(err)}`, fields), image };
  }
  return { id, image, location, prompt, line: lineNo, fields };
}

async function* readList(file: string, root: string, idFrom: 'image' | 'line'): AsyncGenerator<InputRecord> {
  const rl = createInterface({ input: createReadStream(file, { encoding: 'utf8' }), crlfDelay: Infinity });
  let n = 0;
  for await (const raw of rl) {
    n++;
    const rec = parseListLine(raw, n, root, idFrom);
    if (rec) yield rec;
  }
}

export interface LoadImageOptions {
  /** Largest image accepted, in bytes (default 64 MiB). */
  maxBytes?: number;
  /** Timeout for http(s) images (default 60 s). */
  timeoutMs?: number;
  signal?: AbortSignal;
}

export const DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024;

/**
 * Reads an image (a local path, an http(s) URL or a data URI) with the server's image loader
 * (src/images/image-source.ts: redirects, timeout, size cap, format sniffing). Throws RecordError.
 */
export async function loadImage(location: string, opts: LoadImageOptions = {}): Promise<{ bytes: Buffer; format: ImageFormat }> {
  const url = isUrlLike(location) ? location : pathToFileURL(location).href;
  let bytes: Buffer;
  try {
    bytes = await loadImageBytes(url, {
      // The operator named these images: local paths anywhere, and URLs on private networks
      // (dataset servers), unlike a public server's image_url.
      allowedLocalMediaPath: path.parse(path.resolve(location)).root,
      allowPrivateImageUrls: true,
      maxBytes: opts.maxBytes ?? DEFAULT_MAX_IMAGE_BYTES,
      fetchTimeoutMs: opts.timeoutMs ?? 60_000,
    }, opts.signal);
  } catch (err) {
    if (err instanceof ImageInputError) throw new RecordError(err.message, err.code, { cause: err });
    throw new RecordError(`could not read the image: ${errorMessage(err)}`, 'image_read_failed', { cause: err });
  }
  const format = sniffImageFormat(bytes);
  if (!format) {
    throw new RecordError('not a PNG, JPEG, WebP or GIF image (unrecognised file signature)', 'unsupported_image_format');
  }
  return { bytes, format };
}
