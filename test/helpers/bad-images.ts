// Images that real clients send by mistake or on purpose: every format's truncated and corrupt
// forms, decompression bombs, extreme sizes, colour models and bit depths, alpha, animation,
// EXIF rotation. Generated with sharp and zlib (small, deterministic), never downloaded.
import { deflateSync } from 'node:zlib';
import sharp, { type Sharp } from 'sharp';

/** A deterministic, non-uniform RGB picture. */
export function rawPicture(width: number, height: number, channels: 3 | 4 = 3): Buffer {
  const raw = Buffer.alloc(width * height * channels);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = (y * width + x) * channels;
      raw[i] = (x * 255) / Math.max(1, width - 1);
      raw[i + 1] = (y * 255) / Math.max(1, height - 1);
      raw[i + 2] = ((x ^ y) & 16) ? 220 : 30;
      if (channels === 4) raw[i + 3] = (x + y) % 255;
    }
  }
  return raw;
}

export function picture(width: number, height: number, channels: 3 | 4 = 3): Sharp {
  return sharp(rawPicture(width, height, channels), { raw: { width, height, channels } });
}

const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

function crc32(buf: Buffer): number {
  let c = 0xffffffff;
  for (const b of buf) c = CRC_TABLE[(c ^ b) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function chunk(type: string, data: Buffer): Buffer {
  const len = Buffer.alloc(4);
  len.writeUInt32BE(data.length);
  const td = Buffer.concat([Buffer.from(type, 'latin1'), data]);
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(td));
  return Buffer.concat([len, td, crc]);
}

/**
 * A PNG that claims width x height (8-bit RGB) and holds `rows` rows of zeros: a decompression
 * bomb when the claim is huge (a few KB on the wire, gigabytes decoded).
 */
export function pngClaiming(width: number, height: number, rows = 1): Buffer {
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr[8] = 8; // bit depth
  ihdr[9] = 2; // RGB
  const row = Buffer.alloc(1 + width * 3);
  const data = deflateSync(Buffer.concat(Array.from({ length: Math.min(rows, height) }, () => row)), { level: 9 });
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk('IHDR', ihdr),
    chunk('IDAT', data),
    chunk('IEND', Buffer.alloc(0)),
  ]);
}

/** Flips bytes in the middle of `b` (deterministically), keeping the header. */
export function corrupt(b: Buffer, from = 0.3): Buffer {
  const out = Buffer.from(b);
  const start = Math.floor(out.length * from);
  for (let i = start; i < Math.min(out.length, start + 64); i++) out[i] = (out[i]! * 31 + 7) & 0xff;
  return out;
}

export function truncate(b: Buffer, keep = 0.5): Buffer {
  return b.subarray(0, Math.max(16, Math.floor(b.length * keep)));
}

export const dataUri = (b: Buffer, type = 'image/png') => `data:${type};base64,${b.toString('base64')}`;

export interface ImageCase {
  name: string;
  bytes: Buffer;
  /** What the server must do with it. */
  expect: 'ok' | 'refused';
  /** For 'refused': the message must match. */
  message?: RegExp;
  /** For 'ok': the size the image must reach the engine at (after orientation), w x h before resizing. */
  oriented?: [number, number];
}

/** Every bad-input image case. */
export async function imageCases(): Promise<ImageCase[]> {
  const png = await picture(96, 64).png().toBuffer();
  const jpeg = await picture(96, 64).jpeg().toBuffer();
  const webp = await picture(96, 64).webp().toBuffer();
  const gif = await picture(96, 64).gif().toBuffer();
  const frames = await Promise.all([0, 1, 2].map((i) => picture(64, 48).modulate({ hue: i * 90 }).png().toBuffer()));
  const animatedGif = await sharp(frames, { join: { animated: true } }).gif({ loop: 0, delay: [100, 100, 100] }).toBuffer();
  const animatedWebp = await sharp(frames, { join: { animated: true } }).webp({ loop: 0, delay: [100, 100, 100] }).toBuffer();
  const cases: ImageCase[] = [
    { name: '1x1 PNG', bytes: await picture(1, 1).png().toBuffer(), expect: 'ok', oriented: [1, 1] },
    { name: '1x1 GIF', bytes: await picture(1, 1).gif().toBuffer(), expect: 'ok' },
    { name: 'CMYK JPEG', bytes: await picture(80, 60).toColourspace('cmyk').jpeg().toBuffer(), expect: 'ok', oriented: [80, 60] },
    { name: '16-bit PNG', bytes: await picture(80, 60).toColourspace('rgb16').png().toBuffer(), expect: 'ok' },
    { name: '16-bit grey PNG with alpha', bytes: await picture(50, 40, 4).toColourspace('grey16').png().toBuffer(), expect: 'ok' },
    { name: 'RGBA PNG', bytes: await picture(80, 60, 4).png().toBuffer(), expect: 'ok' },
    { name: 'palette PNG', bytes: await picture(80, 60).png({ palette: true, colours: 16 }).toBuffer(), expect: 'ok' },
    { name: 'greyscale JPEG', bytes: await picture(80, 60).greyscale().jpeg().toBuffer(), expect: 'ok' },
    { name: 'WebP with alpha', bytes: await picture(80, 60, 4).webp().toBuffer(), expect: 'ok' },
    { name: 'animated GIF (first frame)', bytes: animatedGif, expect: 'ok', oriented: [64, 48] },
    { name: 'animated WebP (first frame)', bytes: animatedWebp, expect: 'ok', oriented: [64, 48] },
    { name: 'EXIF-rotated JPEG (orientation 6)', bytes: await picture(96, 64).jpeg().withMetadata({ orientation: 6 }).toBuffer(), expect: 'ok', oriented: [64, 96] },
    { name: 'progressive JPEG', bytes: await picture(96, 64).jpeg({ progressive: true }).toBuffer(), expect: 'ok' },
    { name: 'interlaced PNG', bytes: await picture(96, 64).png({ progressive: true }).toBuffer(), expect: 'ok' },
    { name: '30000x30000 PNG (decompression bomb)', bytes: pngClaiming(30000, 30000, 4), expect: 'refused', message: /more than 178956970 pixels.*send a smaller image/ },
    // Above PIL's bomb bound (2 * 89478485 px), below sharp's own 268 Mpx: our limit is PIL's.
    { name: '14000x13000 PNG (over PIL\'s bound)', bytes: pngClaiming(14000, 13000, 4), expect: 'refused', message: /more than 178956970 pixels/ },
    { name: '1x40000 PNG (aspect ratio)', bytes: pngClaiming(1, 40000, 40000), expect: 'refused', message: /aspect ratio/ },
    { name: '300x1 PNG (aspect ratio)', bytes: await picture(300, 1).png().toBuffer(), expect: 'refused', message: /aspect ratio/ },
    { name: 'PNG claiming 0x0', bytes: pngClaiming(0, 0), expect: 'refused', message: /decode|size|dimension/i },
    { name: 'truncated PNG', bytes: truncate(png), expect: 'refused', message: /could not decode the image/ },
    { name: 'truncated JPEG', bytes: truncate(jpeg, 0.4), expect: 'refused', message: /could not decode the image/ },
    { name: 'truncated WebP', bytes: truncate(webp), expect: 'refused', message: /could not decode the image/ },
    { name: 'truncated GIF', bytes: truncate(gif, 0.3), expect: 'refused', message: /could not decode the image/ },
    { name: 'PNG header only', bytes: png.subarray(0, 8), expect: 'refused', message: /could not decode the image/ },
    { name: 'corrupt PNG (bad CRC / data)', bytes: corrupt(png), expect: 'refused', message: /could not decode the image/ },
    { name: 'corrupt JPEG', bytes: corrupt(jpeg, 0.05), expect: 'refused', message: /could not decode the image/ },
    { name: 'corrupt WebP', bytes: corrupt(webp, 0.2), expect: 'refused', message: /could not decode the image/ },
    { name: 'BMP (unsupported format)', bytes: Buffer.concat([Buffer.from('BM'), Buffer.alloc(60)]), expect: 'refused', message: /PNG, JPEG, WebP or GIF/ },
    { name: 'SVG (unsupported format)', bytes: Buffer.from('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><image href="http://169.254.169.254/"/></svg>'), expect: 'refused', message: /PNG, JPEG, WebP or GIF/ },
    { name: 'text bytes', bytes: Buffer.from('this is not an image at all'), expect: 'refused', message: /PNG, JPEG, WebP or GIF/ },
    { name: 'empty after the signature', bytes: Buffer.from([0xff, 0xd8, 0xff]), expect: 'refused', message: /could not decode the image/ },
  ];
  return cases;
}
