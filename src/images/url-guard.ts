// Keeps remote image URLs away from the server's own network: loopback, private (RFC 1918, ULA),
// link-local (cloud metadata at 169.254.169.254), CGNAT, multicast, reserved and documentation
// ranges, in IPv4 and IPv6 (IPv4-mapped, NAT64 and 6to4 addresses are judged by the IPv4
// address inside). Unless allowed (--allow-private-image-urls):
//   - an IP-literal host is checked as written;
//   - a name is resolved and EVERY address it resolves to must be public;
//   - the connection is made to an address that passed the check, by handing the socket a
//     checking `lookup` (so a DNS answer that changes between check and connect, "DNS
//     rebinding", cannot slip a private address in);
//   - each redirect hop is a new guardedFetch call, checked the same way.
// guardedFetch is a drop-in for `fetch(url, { redirect: 'manual', signal, headers })`: it returns
// a WHATWG Response (status, headers, streamed body) from node:http(s), whose sockets take a
// lookup function (the global fetch's do not).
import dns from 'node:dns';
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';
import { Readable } from 'node:stream';
import { ImageInputError } from './errors.js';

export interface ResolvedAddress {
  address: string;
  family: number;
}

export interface UrlGuardOptions {
  /** Let URLs reach loopback / private / link-local / reserved addresses (--allow-private-image-urls). */
  allowPrivate?: boolean;
  /** Name resolution (default: dns.lookup with all addresses); tests inject their own. */
  resolve?: (hostname: string) => Promise<ResolvedAddress[]>;
  /** Why an address is refused, or null (default: addressBlockReason); tests inject their own. */
  blockReason?: (address: string) => string | null;
}

const V4_RANGES: [string, number, string][] = [
  ['0.0.0.0', 8, 'a "this network" address'],
  ['10.0.0.0', 8, 'a private address'],
  ['100.64.0.0', 10, 'a carrier-grade NAT address'],
  ['127.0.0.0', 8, 'a loopback address'],
  ['169.254.0.0', 16, 'a link-local address'],
  ['172.16.0.0', 12, 'a private address'],
  ['192.0.0.0', 24, 'an IETF protocol address'],
  ['192.0.2.0', 24, 'a documentation address'],
  ['192.88.99.0', 24, 'a 6to4 relay address'],
  ['192.168.0.0', 16, 'a private address'],
  ['198.18.0.0', 15, 'a benchmarking address'],
  ['198.51.100.0', 24, 'a documentation address'],
  ['203.0.113.0', 24, 'a documentation address'],
  ['224.0.0.0', 4, 'a multicast address'],
  ['240.0.0.0', 4, 'a reserved address'],
];

const V6_RANGES: [string, number, string][] = [
  ['::', 128, 'the unspecified address'],
  ['::1', 128, 'a loopback address'],
  ['64:ff9b:1::', 48, 'a local NAT64 address'],
  ['100::', 64, 'a discard-only address'],
  ['2001::', 23, 'an IETF protocol address'],
  ['2001:db8::', 32, 'a documentation address'],
  ['fc00::', 7, 'a private (unique local) address'],
  ['fe80::', 10, 'a link-local address'],
  ['fec0::', 10, 'a site-local address'],
  ['ff00::', 8, 'a multicast address'],
];

function blockList(ranges: [string, number, string][], type: 'ipv4' | 'ipv6'): [net.BlockList, string][] {
  return ranges.map(([addr, prefix, why]) => {
    const b = new net.BlockList();
    b.addSubnet(addr, prefix, type);
    return [b, why];
  });
}

const V4_BLOCKS = blockList(V4_RANGES, 'ipv4');
const V6_BLOCKS = blockList(V6_RANGES, 'ipv6');

/** The 16 bytes of an IPv6 address. */
function v6Bytes(addr: string): number[] | null {
  let s = addr.split('%')[0]!;
  // A trailing dotted IPv4 part becomes two hex groups.
  const dotted = /(\d+\.\d+\.\d+\.\d+)$/.exec(s);
  if (dotted) {
    const p = dotted[1]!.split('.').map(Number);
    s = s.slice(0, -dotted[1]!.length) + `${((p[0]! << 8) | p[1]!).toString(16)}:${((p[2]! << 8) | p[3]!).toString(16)}`;
  }
  const halves = s.split('::');
  if (halves.length > 2) return null;
  const head = halves[0] ? halves[0].split(':') : [];
  const tail = halves.length === 2 && halves[1] ? halves[1].split(':') : [];
  const missing = 8 - head.length - tail.length;
  if (halves.length === 1 ? missing !== 0 : missing < 0) return null;
  const groups = [...head, ...Array<string>(halves.length === 2 ? missing : 0).fill('0'), ...tail];
  const out: number[] = [];
  for (const g of groups) {
    const v = parseInt(g, 16);
    if (!/^[0-9a-f]{1,4}$/i.test(g) || Number.isNaN(v)) return null;
    out.push(v >> 8, v & 0xff);
  }
  return out;
}

/** The IPv4 address an IPv6 address carries (IPv4-mapped, IPv4-compatible, NAT64, 6to4), if any. */
function embeddedV4(b: number[]): string | null {
  const zero = (from: number, to: number) => b.slice(from, to).every((x) => x === 0);
  const v4 = (at: number) => b.slice(at, at + 4).join('.');
  if (zero(0, 10) && b[10] === 0xff && b[11] === 0xff) return v4(12); // ::ffff:a.b.c.d
  if (zero(0, 12) && !zero(12, 16) && !(zero(12, 15) && b[15] === 1)) return v4(12); // ::a.b.c.d (deprecated)
  if (b[0] === 0x00 && b[1] === 0x64 && b[2] === 0xff && b[3] === 0x9b && zero(4, 12)) return v4(12); // 64:ff9b::/96
  if (b[0] === 0x20 && b[1] === 0x02) return v4(2); // 2002:AABB:CCDD::/16
  return null;
}

/** Why a remote image may not come from this address, or null when it is a public one. */
export function addressBlockReason(address: string): string | null {
  const type = net.isIP(address);
  if (type === 4) {
    for (const [b, why] of V4_BLOCKS) if (b.check(address, 'ipv4')) return why;
    if (address === '255.255.255.255') return 'the broadcast address';
    return null;
  }
  if (type === 6) {
    const bytes = v6Bytes(address.toLowerCase());
    if (!bytes) return 'an unparseable IPv6 address';
    const inner = embeddedV4(bytes);
    if (inner) return addressBlockReason(inner);
    for (const [b, why] of V6_BLOCKS) if (b.check(address.split('%')[0]!, 'ipv6')) return why;
    return null;
  }
  return 'not an IP address';
}

async function defaultResolve(hostname: string): Promise<ResolvedAddress[]> {
  return dns.promises.lookup(hostname, { all: true, verbatim: true });
}

function refused(host: string, address: string, why: string): ImageInputError {
  const shownHost = host === address ? address : `${host} (${address})`;
  return new ImageInputError(
    'image_fetch_failed',
    `image URL refused: ${shownHost} is ${why}; remote images must come from public addresses ` +
    '(start the server with --allow-private-image-urls to allow private ones)',
  );
}

/** The host of a URL as the resolver wants it ([::1] -> ::1). */
function bareHost(u: URL): string {
  return u.hostname.startsWith('[') && u.hostname.endsWith(']') ? u.hostname.slice(1, -1) : u.hostname;
}

/**
 * Resolves a URL's host and checks every address; resolves to the addresses (all allowed),
 * throws ImageInputError naming the first refused one.
 */
export async function checkUrlHost(url: string | URL, opts: UrlGuardOptions = {}): Promise<ResolvedAddress[]> {
  const u = typeof url === 'string' ? new URL(url) : url;
  const host = bareHost(u);
  const reason = opts.blockReason ?? addressBlockReason;
  if (net.isIP(host)) {
    const why = opts.allowPrivate ? null : reason(host);
    if (why) throw refused(host, host, why);
    return [{ address: host, family: net.isIP(host) }];
  }
  let addrs: ResolvedAddress[];
  try {
    addrs = await (opts.resolve ?? defaultResolve)(host);
  } catch (err) {
    const code = (err as { code?: string }).code;
    throw new ImageInputError('image_fetch_failed', `could not resolve the image host ${host}${code ? ` (${code})` : ''}`);
  }
  if (addrs.length === 0) throw new ImageInputError('image_fetch_failed', `could not resolve the image host ${host}`);
  if (!opts.allowPrivate) {
    for (const a of addrs) {
      const why = reason(a.address);
      if (why) throw refused(host, a.address, why);
    }
  }
  return addrs;
}

type LookupCallback = (err: NodeJS.ErrnoException | null, address: string | dns.LookupAddress[], family?: number) => void;

/**
 * A `lookup` for net/http/https sockets (and undici's connect options) that resolves with
 * checkUrlHost's rules: the socket only ever connects to an address that passed.
 */
export function guardedLookup(opts: UrlGuardOptions = {}) {
  return (hostname: string, options: dns.LookupOptions | number, callback: LookupCallback): void => {
    const o = typeof options === 'number' ? { family: options } : options;
    checkUrlHost(`http://${net.isIP(hostname) === 6 ? `[${hostname}]` : hostname}/`, opts).then(
      (addrs) => {
        const family = o.family === 4 || o.family === 6 ? o.family : o.family === 'IPv4' ? 4 : o.family === 'IPv6' ? 6 : 0;
        const wanted = family ? addrs.filter((a) => a.family === family) : addrs;
        if (wanted.length === 0) {
          const e: NodeJS.ErrnoException = new Error(`no IPv${family} address for ${hostname}`);
          e.code = 'ENOTFOUND';
          callback(e, '', 0);
          return;
        }
        if (o.all) callback(null, wanted.map((a) => ({ address: a.address, family: a.family })));
        else callback(null, wanted[0]!.address, wanted[0]!.family);
      },
      (err: NodeJS.ErrnoException) => callback(err, '', 0),
    );
  };
}

export interface GuardedFetchInit extends UrlGuardOptions {
  signal?: AbortSignal;
  headers?: Record<string, string>;
}

const NULL_BODY_STATUS = new Set([101, 204, 205, 304]);

/**
 * GET `url` without following redirects (a 3xx comes back as is; fetch the Location with another
 * call, which checks it again), through sockets that only reach allowed addresses. The body is
 * streamed: the caller caps its size and cancels it.
 */
export async function guardedFetch(url: string, init: GuardedFetchInit = {}): Promise<Response> {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new ImageInputError('image_fetch_failed', 'the image URL is not a valid URL');
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') {
    throw new ImageInputError('unsupported_url_scheme', `only http: and https: image URLs are fetched, got ${u.protocol}`);
  }
  // IP literals never reach `lookup`: check them here. Names are resolved and checked by `lookup`.
  if (net.isIP(bareHost(u))) await checkUrlHost(u, init);
  const lookup = guardedLookup(init);
  const mod = u.protocol === 'https:' ? https : http;
  return new Promise<Response>((resolve, reject) => {
    const req = mod.request(u, {
      method: 'GET',
      // No pooling: a socket is only ever used for the host it was checked for.
      agent: false,
      lookup: lookup as unknown as typeof dns.lookup,
      signal: init.signal,
      headers: { 'accept-encoding': 'identity', ...init.headers },
    });
    req.once('error', (err) => reject(err));
    req.once('response', (res) => {
      const headers = new Headers();
      for (const [k, v] of Object.entries(res.headers)) {
        if (Array.isArray(v)) for (const x of v) headers.append(k, x);
        else if (v !== undefined) headers.set(k, v);
      }
      const status = res.statusCode ?? 502;
      const nullBody = NULL_BODY_STATUS.has(status);
      if (nullBody) res.resume();
      try {
        resolve(new Response(
          nullBody ? null : (Readable.toWeb(res) as unknown as ReadableStream<Uint8Array>),
          { status: status >= 200 && status <= 599 ? status : 502, statusText: res.statusMessage ?? '', headers },
        ));
      } catch (err) {
        res.destroy();
        reject(err);
      }
    });
    req.end();
  });
}

/** guardedFetch with fixed guard options, in the shape image-source.ts's `fetch` option takes. */
export function guardedFetcher(opts: UrlGuardOptions = {}) {
  return (url: string, init: { signal?: AbortSignal; headers?: Record<string, string> }): Promise<Response> =>
    guardedFetch(url, { ...opts, signal: init.signal, headers: init.headers });
}
