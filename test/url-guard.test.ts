// Remote image URLs never reach loopback, private, link-local or reserved addresses unless
// --allow-private-image-urls: literals, every resolved address, the address actually connected
// to, every redirect hop; and through the server, a 400 that says what to do.
import t from 'tap';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { ImageInputError } from '../src/images/errors.js';
import { loadImageBytes } from '../src/images/image-source.js';
import { addressBlockReason, checkUrlHost, guardedFetch, guardedLookup, type ResolvedAddress } from '../src/images/url-guard.js';
import { pngDataUri, startTestServer } from './helpers/server.js';

t.test('addresses: which are refused, and why', async (t) => {
  const blocked: [string, RegExp][] = [
    ['127.0.0.1', /loopback/], ['127.255.255.254', /loopback/], ['10.1.2.3', /private/], ['172.16.0.1', /private/],
    ['172.31.255.255', /private/], ['192.168.1.1', /private/], ['169.254.169.254', /link-local/], ['100.64.0.1', /carrier-grade/],
    ['0.0.0.0', /this network/], ['224.0.0.1', /multicast/], ['255.255.255.255', /reserved|broadcast/], ['198.18.0.1', /benchmarking/],
    ['192.0.2.1', /documentation/], ['240.0.0.1', /reserved/],
    ['::1', /loopback/], ['::', /unspecified/], ['fe80::1', /link-local/], ['fe80::1%eth0', /link-local/], ['fc00::1', /unique local/],
    ['fd12:3456::1', /unique local/], ['ff02::1', /multicast/], ['2001:db8::1', /documentation/],
    ['::ffff:127.0.0.1', /loopback/], ['::ffff:7f00:1', /loopback/], ['::ffff:169.254.169.254', /link-local/],
    ['64:ff9b::a00:1', /private/], ['2002:c0a8:101::1', /private/], ['::127.0.0.1', /loopback/], ['FE80::ABCD', /link-local/],
  ];
  for (const [a, why] of blocked) t.match(addressBlockReason(a), why, `${a} refused`);
  for (const a of ['8.8.8.8', '1.1.1.1', '172.32.0.1', '100.128.0.1', '192.169.0.1', '2606:4700:4700::1111', '2001:4860:4860::8888', '::ffff:8.8.8.8', '64:ff9b::808:808']) {
    t.equal(addressBlockReason(a), null, `${a} public`);
  }
  t.match(addressBlockReason('example.com'), /not an IP/);
});

const resolver = (table: Record<string, string[]>) => async (host: string): Promise<ResolvedAddress[]> => {
  const addrs = table[host];
  if (!addrs) throw Object.assign(new Error('not found'), { code: 'ENOTFOUND' });
  return addrs.map((address) => ({ address, family: address.includes(':') ? 6 : 4 }));
};

t.test('names: every resolved address must be public', async (t) => {
  const resolve = resolver({ 'ok.test': ['8.8.8.8', '2606:4700:4700::1111'], 'mixed.test': ['8.8.8.8', '10.0.0.7'], 'meta.test': ['169.254.169.254'] });
  t.same((await checkUrlHost('http://ok.test/a.png', { resolve })).map((a) => a.address), ['8.8.8.8', '2606:4700:4700::1111']);
  await t.rejects(checkUrlHost('http://mixed.test/a.png', { resolve }), { code: 'image_fetch_failed', message: /mixed\.test \(10\.0\.0\.7\) is a private address.*--allow-private-image-urls/ });
  await t.rejects(checkUrlHost('http://meta.test/latest', { resolve }), /link-local/);
  await t.rejects(checkUrlHost('http://nowhere.test/', { resolve }), { code: 'image_fetch_failed', message: /could not resolve the image host nowhere\.test \(ENOTFOUND\)/ });
  await t.rejects(checkUrlHost('http://[::1]:8080/', {}), /loopback/);
  await t.rejects(checkUrlHost('http://127.1/', {}), /loopback/, 'short IPv4 forms are normalised by the URL parser');
  await t.rejects(checkUrlHost('http://2130706433/', {}), /loopback/, 'decimal IPv4');
  await t.rejects(checkUrlHost('http://0x7f.0.0.1/', {}), /loopback/, 'hex IPv4');
  t.ok(await checkUrlHost('http://mixed.test/', { resolve, allowPrivate: true }), 'allowed by the flag');

  // The socket-level lookup answers in both of its shapes, and refuses the same way.
  const lookup = guardedLookup({ resolve });
  const one = await new Promise<unknown[]>((res) => lookup('ok.test', { family: 4 }, (...a) => res(a)));
  t.same(one, [null, '8.8.8.8', 4]);
  const all = await new Promise<unknown[]>((res) => lookup('ok.test', { all: true }, (...a) => res(a)));
  t.same(all[1], [{ address: '8.8.8.8', family: 4 }, { address: '2606:4700:4700::1111', family: 6 }]);
  const bad = await new Promise<unknown[]>((res) => lookup('mixed.test', { all: true }, (...a) => res(a)));
  t.ok(bad[0] instanceof ImageInputError);
});

t.test('fetching: the connection goes only to a checked address, each hop is checked', async (t) => {
  const server = http.createServer((req, res) => {
    if (req.url === '/img') {
      res.writeHead(200, { 'content-type': 'image/png' });
      res.end('PNGDATA');
    } else if (req.url === '/to-private') {
      res.writeHead(302, { location: `http://inside.test:${(server.address() as AddressInfo).port}/img` });
      res.end();
    } else {
      res.writeHead(404);
      res.end();
    }
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  t.teardown(() => server.close());
  const port = (server.address() as AddressInfo).port;

  await t.rejects(guardedFetch(`http://127.0.0.1:${port}/img`), { message: /127\.0\.0\.1 is a loopback address/ }, 'literal');
  await t.rejects(guardedFetch(`http://localhost:${port}/img`), { message: /loopback/ }, 'a name that resolves to loopback');
  const allowed = await guardedFetch(`http://127.0.0.1:${port}/img`, { allowPrivate: true });
  t.equal(allowed.status, 200);
  t.equal(await allowed.text(), 'PNGDATA');
  t.equal(allowed.headers.get('content-type'), 'image/png');

  // "public.test" passes the check (the test calls 127.0.0.1 public) and the socket connects
  // to exactly the address the check saw; "inside.test" resolves to an address it refuses.
  const resolve = resolver({ 'public.test': ['127.0.0.1'], 'inside.test': ['127.0.0.2'] });
  const blockReason = (a: string) => (a === '127.0.0.2' ? 'a test-private address' : null);
  const hop1 = await guardedFetch(`http://public.test:${port}/to-private`, { resolve, blockReason });
  t.equal(hop1.status, 302, 'redirects come back as they are');
  const next = new URL(hop1.headers.get('location')!, `http://public.test:${port}/`).href;
  await t.rejects(guardedFetch(next, { resolve, blockReason }), { message: /inside\.test \(127\.0\.0\.2\) is a test-private address/ }, 'the next hop is checked again');
  t.equal((await guardedFetch(`http://public.test:${port}/img`, { resolve, blockReason })).status, 200);

  await t.rejects(guardedFetch('ftp://example.com/x'), { code: 'unsupported_url_scheme' });
  const ac = new AbortController();
  ac.abort();
  await t.rejects(guardedFetch(`http://127.0.0.1:${port}/img`, { allowPrivate: true, signal: ac.signal }), { name: 'AbortError' });

  // Through image-source: refused by default, and the redirect to a private address too.
  await t.rejects(loadImageBytes(`http://127.0.0.1:${port}/img`), { code: 'image_fetch_failed', message: /--allow-private-image-urls/ });
});

t.test('through the server: a loopback image URL is a 400 naming the flag', async (t) => {
  const s = await startTestServer({ engine: { nThreads: 1 } });
  t.teardown(() => s.close());
  const png = Buffer.from((await pngDataUri(32, 32)).split(',')[1]!, 'base64');
  const server = http.createServer((_req, res) => {
    res.writeHead(200, { 'content-type': 'image/png' });
    res.end(png);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  t.teardown(() => server.close());
  const port = (server.address() as AddressInfo).port;
  for (const url of [`http://127.0.0.1:${port}/a.png`, `http://localhost:${port}/a.png`, `http://[::ffff:127.0.0.1]:${port}/a.png`, 'http://169.254.169.254/latest/meta-data/']) {
    const res = await fetch(`${s.baseURL}/chat/completions`, {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'caprl', max_tokens: 2, messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url } }, { type: 'text', text: 'x' }] }] }),
    });
    t.equal(res.status, 400, url);
    t.match(await res.json(), { error: { type: 'invalid_request_error', param: 'messages[0].content[0].image_url.url', message: /--allow-private-image-urls/ } });
  }
});
