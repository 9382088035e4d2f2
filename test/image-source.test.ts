// image_url sources: data: URIs (including Qwen's "data:image;base64,"), http(s) from a loopback
// server (redirects, size cap, timeout, errors), and file:// under an allowed folder (normalised
// paths, symlinks resolved, nothing outside).
import t from 'tap';
import { mkdirSync, mkdtempSync, realpathSync, symlinkSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import sharp from 'sharp';
import { imageSourceOptionsFromEnv, loadImageBytes, type ImageSourceOptions } from '../src/images/image-source.js';
import { startImageServer } from './helpers/image-server.js';

const png = await sharp({ create: { width: 40, height: 30, channels: 3, background: { r: 200, g: 10, b: 10 } } }).png().toBuffer();

t.test('data: URIs, Qwen-style "data:image;base64," included', async (t) => {
  const b64 = png.toString('base64');
  t.ok((await loadImageBytes(`data:image/png;base64,${b64}`)).equals(png));
  t.ok((await loadImageBytes(`data:image;base64,${b64}`)).equals(png), 'media type "image" without subtype');
  await t.rejects(loadImageBytes('ftp://example.com/x.png'), { code: 'unsupported_url_scheme' });
  await t.rejects(loadImageBytes('cat.png'), { code: 'unsupported_url_scheme' });
});

t.test('http: fetched with redirects, size and time limits', async (t) => {
  const srv = await startImageServer(png);
  t.teardown(() => srv.close());
  // The image server is on loopback: allowed explicitly (url-guard.ts refuses it by default).
  const o: ImageSourceOptions = { fetchTimeoutMs: 1000, maxBytes: 256 * 1024, maxRedirects: 3, allowPrivateImageUrls: true };
  t.ok((await loadImageBytes(`${srv.url}/img.png`, o)).equals(png), 'plain');
  t.ok((await loadImageBytes(`${srv.url}/img-chunked.png?x=1`, o)).equals(png), 'chunked, query string');
  t.ok((await loadImageBytes(`${srv.url}/redirect/3`, o)).equals(png), '3 redirects, relative Location');
  await t.rejects(loadImageBytes(`${srv.url}/redirect/4`, o), { code: 'image_fetch_failed', message: /more than 3 redirects/ });
  await t.rejects(loadImageBytes(`${srv.url}/loop`, o), { code: 'image_fetch_failed', message: /redirects/ });
  await t.rejects(loadImageBytes(`${srv.url}/redirect/1`, { ...o, maxRedirects: 0 }), { message: /redirects are disabled/ });
  await t.rejects(loadImageBytes(`${srv.url}/to-file`, o), { code: 'image_fetch_failed', message: /file: URL refused/ });
  await t.rejects(loadImageBytes(`${srv.url}/big`, o), { code: 'image_too_large', message: /256 KiB|262144|limit/ });
  await t.rejects(loadImageBytes(`${srv.url}/big-chunked`, o), { code: 'image_too_large' }, 'streamed past the cap');
  let start = Date.now();
  await t.rejects(loadImageBytes(`${srv.url}/hang`, { ...o, fetchTimeoutMs: 300 }), { code: 'image_fetch_timeout', message: /longer than 0.3 s/ });
  t.ok(Date.now() - start < 3000, 'no answer: gives up at the timeout');
  start = Date.now();
  await t.rejects(loadImageBytes(`${srv.url}/slow`, { ...o, fetchTimeoutMs: 300 }), { code: 'image_fetch_timeout' });
  t.ok(Date.now() - start < 3000, 'a body that never ends: gives up at the timeout');
  await t.rejects(loadImageBytes(`${srv.url}/missing`, o), { code: 'image_fetch_failed', message: /HTTP 404/ });
  await t.rejects(loadImageBytes(`${srv.url}/not-an-image`, o), { code: 'unsupported_image_format' });
  const closed = await startImageServer(png);
  await closed.close();
  await t.rejects(loadImageBytes(`${closed.url}/img.png`, o), { code: 'image_fetch_failed', message: /ECONNREFUSED/ });
  const ac = new AbortController();
  const p = loadImageBytes(`${srv.url}/hang`, { ...o, fetchTimeoutMs: 10_000 }, ac.signal);
  setTimeout(() => ac.abort(), 50);
  await t.rejects(p, 'the caller can abort a fetch');
  t.notOk(srv.hits.some((h) => h.includes('secret')), 'sanity');
});

t.test('error messages leave query strings out', async (t) => {
  const srv = await startImageServer(png);
  t.teardown(() => srv.close());
  const err = await loadImageBytes(`${srv.url}/missing?token=s3cret`, { fetchTimeoutMs: 1000, allowPrivateImageUrls: true }).catch((e: Error) => e);
  t.match((err as Error).message, /\/missing/);
  t.notMatch((err as Error).message, /s3cret/);
});

t.test('file:// only inside --allowed-local-media-path', async (t) => {
  const root = realpathSync(mkdtempSync(path.join(os.tmpdir(), 'caprl-media-')));
  const allowed = path.join(root, 'allowed');
  mkdirSync(path.join(allowed, 'sub'), { recursive: true });
  writeFileSync(path.join(allowed, 'sub', 'a.png'), png);
  writeFileSync(path.join(root, 'outside.png'), png);
  writeFileSync(path.join(allowed, 'notes.txt'), 'text');
  symlinkSync(path.join(root, 'outside.png'), path.join(allowed, 'escape.png'));
  symlinkSync(path.join(allowed, 'sub', 'a.png'), path.join(allowed, 'inner-link.png'));
  const o: ImageSourceOptions = { allowedLocalMediaPath: allowed };
  const url = (p: string) => pathToFileURL(p).href;

  t.ok((await loadImageBytes(url(path.join(allowed, 'sub', 'a.png')), o)).equals(png), 'inside');
  t.ok((await loadImageBytes(`file://localhost${path.join(allowed, 'sub', 'a.png')}`, o)).equals(png), 'file://localhost/...');
  t.ok((await loadImageBytes(url(path.join(allowed, 'inner-link.png')), o)).equals(png), 'a symlink that stays inside');
  t.ok((await loadImageBytes(`file://${allowed}/sub/../sub/a.png`, o)).equals(png), 'dot segments normalised');
  await t.rejects(loadImageBytes(url(path.join(root, 'outside.png')), o), { code: 'local_media_forbidden', message: /must be inside --allowed-local-media-path/ });
  await t.rejects(loadImageBytes(`file://${allowed}/../outside.png`, o), { code: 'local_media_forbidden' }, '.. out of the folder');
  await t.rejects(loadImageBytes(`file://${allowed}/%2e%2e/outside.png`, o), { code: 'local_media_forbidden' }, 'encoded ..');
  await t.rejects(loadImageBytes(url(path.join(allowed, 'escape.png')), o), { code: 'local_media_forbidden' }, 'a symlink pointing outside');
  await t.rejects(loadImageBytes(url(`${allowed}-sibling/a.png`), o), { code: 'local_media_forbidden' }, 'a sibling sharing the prefix');
  await t.rejects(loadImageBytes(url(allowed), o), { code: 'local_media_forbidden' }, 'the folder itself');
  await t.rejects(loadImageBytes(url(path.join(allowed, 'nope.png')), o), { code: 'local_media_not_found' });
  await t.rejects(loadImageBytes(url(path.join(allowed, 'sub')), o), { code: 'local_media_not_found', message: /not a file/ });
  await t.rejects(loadImageBytes(url(path.join(allowed, 'notes.txt')), o), { code: 'unsupported_image_format' });
  await t.rejects(loadImageBytes(url(path.join(allowed, 'sub', 'a.png')), { ...o, maxBytes: 10 }), { code: 'image_too_large' });
  await t.rejects(loadImageBytes('file://otherhost/etc/passwd', o), { code: 'invalid_data_uri' });
  await t.rejects(loadImageBytes(url(path.join(allowed, 'sub', 'a.png')), {}), { code: 'local_media_not_allowed', message: /--allowed-local-media-path/ });
});

t.test('defaults from vLLM environment variables', async (t) => {
  t.same(imageSourceOptionsFromEnv({}), { fetchTimeoutMs: 5000, maxBytes: 32 * 1024 * 1024, maxRedirects: 10 });
  const o = imageSourceOptionsFromEnv({ VLLM_IMAGE_FETCH_TIMEOUT: '12', VLLM_MEDIA_URL_ALLOW_REDIRECTS: '0', CAPRL_IMAGE_FETCH_MAX_BYTES: '1000' });
  t.same(o, { fetchTimeoutMs: 12000, maxBytes: 1000, maxRedirects: 0 });
});
