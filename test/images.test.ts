// Image preparation on real images made with sharp: formats, EXIF orientation, alpha,
// grayscale, 16-bit, CMYK, sizes, and data URI errors.
import t, { type Test } from 'tap';
import sharp from 'sharp';
import { createHash } from 'node:crypto';
import { loadAddon } from '../src/engine/native.js';
import { decodeImageDataUri, sniffImageFormat } from '../src/images/decode-data-uri.js';
import { ImageInputError } from '../src/images/errors.js';
import { DecodeBudget } from '../src/images/decode-budget.js';
import { prepareImage, prepareImageFromDataUri } from '../src/images/prepare.js';
import { lcgImage, PILLOW_CASES } from './helpers/pillow-cases.js';

type RGB = { r: number; g: number; b: number };

function solid(width: number, height: number, c: RGB, alpha?: number) {
  return sharp({
    create: { width, height, channels: alpha === undefined ? 3 : 4, background: { ...c, alpha: alpha ?? 1 } },
  });
}

/** Left half `left`, right half `right`. */
async function twoColour(width: number, height: number, left: RGB, right: RGB) {
  const half = await solid(width / 2, height, left).png().toBuffer();
  return sharp(await solid(width, height, right).composite([{ input: half, left: 0, top: 0 }]).png().toBuffer());
}

function pixel(img: { width: number; rgb: Buffer }, x: number, y: number): number[] {
  const i = (y * img.width + x) * 3;
  return [img.rgb[i]!, img.rgb[i + 1]!, img.rgb[i + 2]!];
}

function near(t: Test, got: number[], want: number[], tol: number, msg: string): void {
  t.ok(got.every((v, k) => Math.abs(v - want[k]!) <= tol), `${msg}: got [${got}] want [${want}] ±${tol}`);
}

function dataUri(type: string, bytes: Buffer): string {
  return `data:${type};base64,${bytes.toString('base64')}`;
}

const RED = { r: 255, g: 0, b: 0 };
const BLUE = { r: 0, g: 0, b: 255 };

t.test('PNG, JPEG, WebP and GIF come out as RGB at multiples of 28', async (t) => {
  const inputs: [string, Buffer, number, number][] = [
    ['png', await solid(100, 60, { r: 10, g: 200, b: 30 }).png().toBuffer(), 112, 56],
    ['jpeg', await solid(640, 480, { r: 10, g: 200, b: 30 }).jpeg({ quality: 95 }).toBuffer(), 644, 476],
    ['webp', await solid(300, 200, { r: 10, g: 200, b: 30 }).webp({ lossless: true }).toBuffer(), 308, 196],
    ['gif', await solid(90, 90, { r: 10, g: 200, b: 30 }).gif().toBuffer(), 84, 84],
  ];
  for (const [format, bytes, w, h] of inputs) {
    t.equal(sniffImageFormat(bytes), format);
    const img = await prepareImageFromDataUri(dataUri(`image/${format}`, bytes));
    t.equal(img.width, w, `${format} width`);
    t.equal(img.height, h, `${format} height`);
    t.equal(img.width % 28, 0);
    t.equal(img.height % 28, 0);
    t.equal(img.rgb.length, img.width * img.height * 3, `${format} buffer is w*h*3`);
    near(t, pixel(img, Math.floor(w / 2), Math.floor(h / 2)), [10, 200, 30], format === 'gif' ? 12 : 3, `${format} colour`);
  }
});

t.test('an image already on the grid passes through untouched', async (t) => {
  const w = 84, h = 56;
  const noise = Buffer.alloc(w * h * 3);
  for (let i = 0; i < noise.length; i++) noise[i] = (i * 2654435761) >>> 24;
  const png = await sharp(noise, { raw: { width: w, height: h, channels: 3 } }).png().toBuffer();
  const img = await prepareImage(png);
  t.equal(img.width, w);
  t.equal(img.height, h);
  t.ok(img.rgb.equals(noise), 'pixels unchanged');
});

t.test('images are resized as PIL resizes them (Image.BICUBIC), bit for bit', async (t) => {
  const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
  // Through prepareImage: the cases whose smart_resize size is the Pillow fixture's size.
  let through = 0;
  for (const [w, h, ow, oh, hash] of PILLOW_CASES) {
    if (w < 28 || h < 28 || ow % 28 || oh % 28 || (ow === w && oh === h)) continue;
    const png = await sharp(lcgImage(w, h), { raw: { width: w, height: h, channels: 3 } }).png().toBuffer();
    const img = await prepareImage(png);
    if (img.width !== ow || img.height !== oh) continue;
    t.equal(sha(img.rgb), hash, `prepareImage ${w}x${h} -> ${ow}x${oh} equals Pillow`);
    through++;
  }
  t.ok(through >= 2, `${through} fixtures go through prepareImage`);
  // The addon's resizer itself, on every fixture (enlarging, shrinking, 1x1, both ways at once).
  const { resizeRgb } = loadAddon();
  for (const [w, h, ow, oh, hash] of PILLOW_CASES) {
    t.equal(sha(await resizeRgb(lcgImage(w, h), w, h, ow, oh)), hash, `resizeRgb ${w}x${h} -> ${ow}x${oh} equals Pillow`);
  }
  t.throws(() => resizeRgb(Buffer.alloc(10), 2, 2, 4, 4), /width \* height \* 3/, 'a short buffer is refused');
  t.throws(() => resizeRgb(Buffer.alloc(12), 2, 2, 0, 4), /outWidth must be an integer/, 'a zero side is refused');
});

t.test('decoded pixels held at once stay under the decode budget', async (t) => {
  // The budget itself: in arrival order, an oversized request alone, releases wake the next.
  const b = new DecodeBudget(100);
  const order: string[] = [];
  const r1 = await b.acquire(60);
  const p2 = b.acquire(60).then((rel) => { order.push('second'); return rel; });
  const p3 = b.acquire(10).then((rel) => { order.push('third'); return rel; });  // fits, but waits its turn
  await new Promise((r) => setImmediate(r));
  t.same(order, [], 'nothing starts past the limit, nor ahead of an earlier waiter');
  r1();
  r1();  // a second release is ignored
  const [r2, r3] = await Promise.all([p2, p3]);
  t.same(order, ['second', 'third'], 'arrival order');
  const p4 = b.acquire(500).then((rel) => { order.push('big'); return rel; });
  await new Promise((r) => setImmediate(r));
  t.notOk(order.includes('big'), 'an image above the limit waits until it is alone');
  r2();
  r3();
  (await p4)();
  t.same(order, ['second', 'third', 'big']);
  t.equal(b.peakBytes, 500, 'peak: the oversized one, alone');

  // Through prepareImage: six 1000x1000 images at once (3 MB decoded each) under a 7 MB budget.
  const budget = new DecodeBudget(7e6);
  const png = await sharp(lcgImage(1000, 1000), { raw: { width: 1000, height: 1000, channels: 3 } }).png().toBuffer();
  const imgs = await Promise.all(Array.from({ length: 6 }, () => prepareImage(png, { decodeBudget: budget })));
  t.ok(imgs.every((i) => i.width === 1008 && i.height === 1008), 'all six prepared');
  t.ok(budget.peakBytes <= 7e6 && budget.peakBytes >= 6e6, `at most two decoded at once (peak ${budget.peakBytes} bytes)`);
  // A decode that fails after its size was read (truncated PNG) gives its share back: with room
  // for one image only, the next one would otherwise wait for ever.
  const one = new DecodeBudget(3e6);
  await t.rejects(prepareImage(png.subarray(0, png.length >> 1), { decodeBudget: one }), { code: 'image_decode_failed' });
  const again = await prepareImage(png, { decodeBudget: one });
  t.equal(again.width, 1008, 'a failed decode gives its share back');
});

t.test('EXIF orientation is applied', async (t) => {
  // 112x56 landscape, red left / blue right, stored with orientation 6 (rotate 90° clockwise):
  // upright it is 56x112 portrait with red on top.
  const jpeg = await (await twoColour(112, 56, RED, BLUE)).jpeg({ quality: 95 }).withMetadata({ orientation: 6 }).toBuffer();
  const meta = await sharp(jpeg).metadata();
  t.equal(meta.orientation, 6);
  const img = await prepareImage(jpeg);
  t.equal(img.originalWidth, 56);
  t.equal(img.originalHeight, 112);
  t.equal(img.width, 56);
  t.equal(img.height, 112);
  near(t, pixel(img, 28, 10), [255, 0, 0], 40, 'top is red');
  near(t, pixel(img, 28, 100), [0, 0, 255], 40, 'bottom is blue');

  // Orientation 3 (180°): red ends up on the right.
  const j3 = await (await twoColour(112, 56, RED, BLUE)).jpeg({ quality: 95 }).withMetadata({ orientation: 3 }).toBuffer();
  const i3 = await prepareImage(j3);
  t.equal(i3.width, 112);
  near(t, pixel(i3, 100, 28), [255, 0, 0], 40, '180°: right is red');
});

t.test('alpha is flattened onto white', async (t) => {
  const clear = await prepareImage(await solid(56, 56, RED, 0).png().toBuffer());
  near(t, pixel(clear, 10, 10), [255, 255, 255], 0, 'fully transparent -> white');
  const half = await prepareImage(await solid(56, 56, { r: 0, g: 0, b: 0 }, 0.5).png().toBuffer());
  near(t, pixel(half, 10, 10), [128, 128, 128], 2, '50% black over white -> grey');
  const opaque = await prepareImage(await solid(56, 56, BLUE, 1).webp({ lossless: true }).toBuffer());
  near(t, pixel(opaque, 10, 10), [0, 0, 255], 0, 'opaque RGBA keeps its colour');
  t.equal(opaque.rgb.length, 56 * 56 * 3);
});

t.test('grayscale, 16-bit and CMYK become 8-bit sRGB', async (t) => {
  const grey = await solid(60, 60, { r: 100, g: 100, b: 100 }).toColourspace('b-w').png().toBuffer();
  t.equal((await sharp(grey).metadata()).channels, 1);
  const g = await prepareImage(grey);
  t.equal(g.rgb.length, 56 * 56 * 3);
  near(t, pixel(g, 5, 5), [100, 100, 100], 1, '8-bit grey');

  const grey16 = await solid(60, 60, { r: 128, g: 128, b: 128 }).toColourspace('grey16').png().toBuffer();
  t.equal((await sharp(grey16).metadata()).depth, 'ushort');
  near(t, pixel(await prepareImage(grey16), 5, 5), [128, 128, 128], 1, '16-bit grey');

  const rgb16 = await solid(60, 60, { r: 200, g: 100, b: 50 }).toColourspace('rgb16').png().toBuffer();
  t.equal((await sharp(rgb16).metadata()).depth, 'ushort');
  const c16 = await prepareImage(rgb16);
  t.equal(c16.rgb.length, 56 * 56 * 3);
  near(t, pixel(c16, 5, 5), [200, 100, 50], 1, '16-bit RGB');

  const greyAlpha = await solid(56, 56, { r: 0, g: 0, b: 0 }, 0).toColourspace('b-w').png().toBuffer();
  near(t, pixel(await prepareImage(greyAlpha), 5, 5), [255, 255, 255], 0, 'grey + alpha flattens to white');

  const cmyk = await solid(56, 56, { r: 0, g: 0, b: 255 }).toColourspace('cmyk').jpeg().toBuffer();
  t.equal((await sharp(cmyk).metadata()).space, 'cmyk');
  const c = await prepareImage(cmyk);
  t.equal(c.rgb.length, 56 * 56 * 3);
  const [r, gg, b] = pixel(c, 5, 5);
  // Pure sRGB blue is outside the CMYK gamut, so only its hue survives the round trip.
  t.ok(b! > r! + 60 && b! > gg! + 60, `CMYK blue stays blue: [${r}, ${gg}, ${b}]`);
});

t.test('large images are scaled down under max_pixels; limits are configurable', async (t) => {
  const huge = await prepareImage(await solid(5000, 4000, RED).jpeg().toBuffer());
  t.same([huge.width, huge.height], [4004, 3192], 'HF smart_resize(4000, 5000) = (3192, 4004): scaled under max_pixels');
  t.ok(huge.width * huge.height <= 12845056);
  const big = await solid(4000, 3000, RED).jpeg().toBuffer();
  const img = await prepareImage(big);
  t.same([img.width, img.height], [4004, 2996], 'HF smart_resize(3000, 4000) = (2996, 4004): 12.0 Mpx fits');
  const small = await prepareImage(big, { minPixels: 6272, maxPixels: 3211264 });
  t.ok(small.width * small.height <= 3211264);
  t.equal(small.width % 28, 0);
});

t.test('an aspect ratio above 200 is refused', async (t) => {
  const thin = await solid(2010, 10, RED).png().toBuffer();
  await t.rejects(prepareImage(thin), { name: 'ImageInputError', code: 'invalid_image_size' });
});

t.test('data URI errors are typed and clear', async (t) => {
  const png = await solid(30, 30, RED).png().toBuffer();
  const cases: [string, string, RegExp][] = [
    ['https://example.com/cat.png', 'unsupported_url_scheme', /https: scheme is not supported|https: scheme are not supported/],
    ['file:///etc/passwd', 'unsupported_url_scheme', /file:/],
    ['cat.png', 'unsupported_url_scheme', /base64 data URI/],
    ['data:image/png;base64', 'invalid_data_uri', /no ","/],
    [`data:image/png,${png.toString('base64')}`, 'invalid_data_uri', /only base64/],
    [`data:text/plain;base64,${png.toString('base64')}`, 'invalid_data_uri', /image\/\* type/],
    ['data:image/png;base64,', 'invalid_base64', /no data/],
    ['data:image/png;base64,iVBOR$$$w0KGgo=', 'invalid_base64', /not valid base64/],
    ['data:image/png;base64,QUJDRA=', 'invalid_base64', /not valid base64/],
    [`data:image/png;base64,${Buffer.from('hello, this is text, not an image').toString('base64')}`, 'unsupported_image_format', /PNG, JPEG, WebP or GIF/],
    [`data:image/bmp;base64,${Buffer.from('BM\x00\x00\x00\x00\x00\x00').toString('base64')}`, 'unsupported_image_format', /unrecognised/],
  ];
  for (const [url, code, message] of cases) {
    t.throws(() => decodeImageDataUri(url), { name: 'ImageInputError', code, message }, url.slice(0, 40));
  }
  // Declared type is not trusted: JPEG bytes labelled PNG still decode; whitespace is tolerated.
  const jpeg = await solid(30, 30, RED).jpeg().toBuffer();
  t.equal(decodeImageDataUri(dataUri('image/png', jpeg)).format, 'jpeg');
  const wrapped = `data:image/png;base64,${png.toString('base64').replace(/(.{20})/g, '$1\n')}`;
  t.ok(decodeImageDataUri(wrapped).bytes.equals(png));
  t.equal(decodeImageDataUri(`data:;base64,${png.toString('base64')}`).format, 'png', 'empty media type is fine');
});

t.test('corrupt image bytes -> image_decode_failed', async (t) => {
  const png = await solid(64, 64, RED).png().toBuffer();
  const truncated = png.subarray(0, 40); // signature + part of IHDR
  const err = await prepareImageFromDataUri(dataUri('image/png', truncated)).then(() => null, (e: unknown) => e);
  t.ok(err instanceof ImageInputError, 'ImageInputError');
  t.match(err, { code: 'image_decode_failed', message: /could not decode the image/ });
  const garbage = Buffer.concat([Buffer.from([0xff, 0xd8, 0xff]), Buffer.alloc(100, 7)]);
  await t.rejects(prepareImage(garbage), { code: 'image_decode_failed' });
});
