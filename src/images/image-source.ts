// Where an image_url points, turned into image bytes, as vLLM's MediaConnector does:
//   data:   base64 data URI (decode-data-uri.ts)
//   http(s) fetched through url-guard.ts (only public addresses unless --allow-private-image-urls,
//           checked at connect time, on every hop): redirects followed by hand (at most maxRedirects, to
//           http(s) only), one AbortSignal timeout over the whole fetch (VLLM_IMAGE_FETCH_TIMEOUT,
//           5 s by default), and the body streamed against a size cap.
//   file:   only under --allowed-local-media-path: the path is normalised, symlinks are
//           resolved, and the real path must stay inside the allowed folder.
// Every failure is an ImageInputError (the client's fault, HTTP 400) with a message that names
// the problem. The bytes must sniff as PNG, JPEG, WebP or GIF whatever their source.
import { constants } from 'node:fs';
import { open, realpath } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { decodeImageDataUri, sniffImageFormat } from './decode-data-uri.js';
import { guardedFetcher } from './url-guard.js';
import { ImageInputError } from './errors.js';

export interface ImageSourceOptions {
  /** Real path of the folder file:// URLs may read from; without it file:// is refused. */
  allowedLocalMediaPath?: string;
  /** Whole-fetch time limit in ms (connect, redirects, body). */
  fetchTimeoutMs?: number;
  /** Largest image body fetched or read, in bytes. */
  maxBytes?: number;
  /** Redirects followed per fetch; 0 refuses any. */
  maxRedirects?: number;
  /** Let http(s) URLs reach loopback, private, link-local and reserved addresses (--allow-private-image-urls). */
  allowPrivateImageUrls?: boolean;
  /**
   * The fetch used for each hop (always called with redirect: 'manual'); default url-guard.ts's
   * guardedFetch, which refuses non-public addresses unless allowPrivateImageUrls.
   */
  fetch?: (url: string, init: { redirect: 'manual'; signal: AbortSignal; headers: Record<string, string> }) => Promise<Response>;
}

export const DEFAULT_FETCH_TIMEOUT_MS = 5_000;
export const DEFAULT_MAX_IMAGE_BYTES = 32 * 1024 * 1024;
export const DEFAULT_MAX_REDIRECTS = 10;

/**
 * Defaults from vLLM's environment variables where vLLM has one:
 * VLLM_IMAGE_FETCH_TIMEOUT (seconds, default 5), VLLM_MEDIA_URL_ALLOW_REDIRECTS (default 1);
 * CAPRL_IMAGE_FETCH_MAX_BYTES for the size cap (default 32 MiB).
 */
export function imageSourceOptionsFromEnv(env: NodeJS.ProcessEnv = process.env): Required<Omit<ImageSourceOptions, 'allowedLocalMediaPath' | 'fetch' | 'allowPrivateImageUrls'>> {
  const num = (v: string | undefined, def: number): number => {
    const n = v === undefined || v.trim() === '' ? NaN : Number(v);
    return Number.isFinite(n) && n >= 0 ? n : def;
  };
  const allowRedirects = !['0', 'false', 'no', 'off'].includes((env.VLLM_MEDIA_URL_ALLOW_REDIRECTS ?? '1').trim().toLowerCase());
  return {
    fetchTimeoutMs: num(env.VLLM_IMAGE_FETCH_TIMEOUT, DEFAULT_FETCH_TIMEOUT_MS / 1000) * 1000,
    maxBytes: Math.floor(num(env.CAPRL_IMAGE_FETCH_MAX_BYTES, DEFAULT_MAX_IMAGE_BYTES)),
    maxRedirects: allowRedirects ? DEFAULT_MAX_REDIRECTS : 0,
  };
}

/** Short, printable rendering of a URL for messages (no query string: it may carry secrets). */
function shown(url: string): string {
  let s = url;
  try {
    const u = new URL(url);
    s = `${u.protocol}//${u.host}${u.pathname}`;
  } catch {
    // keep as is
  }
  s = s.replace(/[^\x20-\x7e]/g, '?');
  return s.length > 120 ? `${s.slice(0, 117)}...` : s;
}

function mib(n: number): string {
  return n >= 1024 * 1024 ? `${(n / (1024 * 1024)).toFixed(n % (1024 * 1024) === 0 ? 0 : 1)} MiB` : `${n} bytes`;
}

function checkFormat(bytes: Buffer, where: string): Buffer {
  if (!sniffImageFormat(bytes)) {
    throw new ImageInputError('unsupported_image_format', `${where} is not a PNG, JPEG, WebP or GIF image (unrecognised file signature)`);
  }
  return bytes;
}

/** Reads a fetch body, failing as soon as it passes `max` bytes. */
async function readCapped(body: ReadableStream<Uint8Array>, max: number, url: string): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let total = 0;
  const reader = body.getReader();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      total += value.byteLength;
      if (total > max) {
        throw new ImageInputError('image_too_large', `the image at ${shown(url)} is larger than the ${mib(max)} limit`);
      }
      chunks.push(Buffer.from(value.buffer, value.byteOffset, value.byteLength));
    }
  } finally {
    // Stops the download when we bail out early; harmless once done.
    await reader.cancel().catch(() => undefined);
  }
  return Buffer.concat(chunks, total);
}

async function fetchHttp(url: string, opts: ImageSourceOptions, signal?: AbortSignal): Promise<Buffer> {
  const timeoutMs = opts.fetchTimeoutMs ?? DEFAULT_FETCH_TIMEOUT_MS;
  const maxBytes = opts.maxBytes ?? DEFAULT_MAX_IMAGE_BYTES;
  const maxRedirects = opts.maxRedirects ?? DEFAULT_MAX_REDIRECTS;
  const timeout = AbortSignal.timeout(timeoutMs);
  const combined = signal ? AbortSignal.any([signal, timeout]) : timeout;
  const doFetch = opts.fetch ?? guardedFetcher({ allowPrivate: opts.allowPrivateImageUrls });
  const original = url;
  let current = url;
  try {
    for (let redirects = 0; ; redirects++) {
      const res = await doFetch(current, {
        redirect: 'manual',
        signal: combined,
        headers: { accept: 'image/*,*/*;q=0.8', 'user-agent': 'caprl-serve' },
      });
      if (res.status >= 300 && res.status < 400 && res.status !== 304) {
        await res.body?.cancel().catch(() => undefined);
        const location = res.headers.get('location');
        if (!location) {
          throw new ImageInputError('image_fetch_failed', `could not fetch the image at ${shown(original)}: HTTP ${res.status} without a Location header`);
        }
        if (redirects >= maxRedirects) {
          throw new ImageInputError(
            'image_fetch_failed',
            maxRedirects === 0
              ? `could not fetch the image at ${shown(original)}: it redirects, and redirects are disabled (VLLM_MEDIA_URL_ALLOW_REDIRECTS=0)`
              : `could not fetch the image at ${shown(original)}: more than ${maxRedirects} redirects`,
          );
        }
        let next: URL;
        try {
          next = new URL(location, current);
        } catch {
          throw new ImageInputError('image_fetch_failed', `could not fetch the image at ${shown(original)}: invalid redirect Location`);
        }
        if (next.protocol !== 'http:' && next.protocol !== 'https:') {
          throw new ImageInputError('image_fetch_failed', `could not fetch the image at ${shown(original)}: redirect to a ${next.protocol} URL refused`);
        }
        current = next.href;
        continue;
      }
      if (!res.ok) {
        await res.body?.cancel().catch(() => undefined);
        throw new ImageInputError('image_fetch_failed', `could not fetch the image at ${shown(current)}: HTTP ${res.status}${res.statusText ? ` ${res.statusText}` : ''}`);
      }
      const declared = Number(res.headers.get('content-length'));
      if (Number.isFinite(declared) && declared > maxBytes) {
        await res.body?.cancel().catch(() => undefined);
        throw new ImageInputError('image_too_large', `the image at ${shown(current)} is larger than the ${mib(maxBytes)} limit (${declared} bytes)`);
      }
      const bytes = res.body ? await readCapped(res.body, maxBytes, current) : Buffer.alloc(0);
      return checkFormat(bytes, `the file at ${shown(current)}`);
    }
  } catch (err) {
    if (err instanceof ImageInputError) throw err;
    if (timeout.aborted) {
      throw new ImageInputError('image_fetch_timeout', `fetching the image at ${shown(original)} took longer than ${timeoutMs / 1000} s`);
    }
    if (signal?.aborted) throw err; // the client left; nobody reads this
    const cause = (err as { cause?: { code?: string; message?: string } }).cause;
    const why = cause?.code ?? cause?.message ?? (err as Error).message;
    throw new ImageInputError('image_fetch_failed', `could not fetch the image at ${shown(current)}: ${why}`);
  }
}

async function readLocal(url: string, opts: ImageSourceOptions): Promise<Buffer> {
  const root = opts.allowedLocalMediaPath;
  if (!root) {
    throw new ImageInputError(
      'local_media_not_allowed',
      'file:// image URLs are refused: the server was started without --allowed-local-media-path',
    );
  }
  let u: URL;
  let p: string;
  try {
    u = new URL(url);
    if (u.host !== '' && u.host !== 'localhost') throw new Error(`host "${u.host}"`);
    p = path.resolve(fileURLToPath(u));
  } catch (err) {
    throw new ImageInputError('invalid_data_uri', `malformed file:// URL: ${(err as Error).message}`);
  }
  const inside = (candidate: string): boolean => {
    const rel = path.relative(root, candidate);
    return rel === '' ? false : !rel.startsWith('..') && !path.isAbsolute(rel);
  };
  const forbidden = (): ImageInputError =>
    new ImageInputError('local_media_forbidden', `the file path ${p} must be inside --allowed-local-media-path ${root}`);
  // Lexically outside: refused without touching the file system.
  if (!inside(p)) throw forbidden();
  let real: string;
  try {
    real = await realpath(p);
  } catch {
    throw new ImageInputError('local_media_not_found', `no such file: ${p}`);
  }
  // A symlink inside that points outside is outside.
  if (!inside(real)) throw forbidden();
  const maxBytes = opts.maxBytes ?? DEFAULT_MAX_IMAGE_BYTES;
  const fh = await open(real, constants.O_RDONLY | constants.O_NOFOLLOW).catch(() => {
    throw new ImageInputError('local_media_not_found', `cannot read ${p}`);
  });
  try {
    const st = await fh.stat();
    if (!st.isFile()) throw new ImageInputError('local_media_not_found', `${p} is not a file`);
    if (st.size > maxBytes) throw new ImageInputError('image_too_large', `${p} is larger than the ${mib(maxBytes)} limit`);
    const bytes = await fh.readFile();
    return checkFormat(bytes, p);
  } finally {
    await fh.close();
  }
}

/** The bytes an image_url names. `signal` aborts a fetch (the client went away). */
export async function loadImageBytes(url: string, opts: ImageSourceOptions = {}, signal?: AbortSignal): Promise<Buffer> {
  const scheme = /^([a-zA-Z][a-zA-Z0-9+.-]*):/.exec(url)?.[1]?.toLowerCase();
  if (scheme === 'http' || scheme === 'https') return fetchHttp(url, opts, signal);
  if (scheme === 'file') return readLocal(url, opts);
  if (scheme === 'data') return decodeImageDataUri(url).bytes;
  throw new ImageInputError(
    'unsupported_url_scheme',
    `image_url.url must be a data: URI (data:image/png;base64,...), an http(s):// URL or a file:// URL, got "${shown(url)}"`,
  );
}
