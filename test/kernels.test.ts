// kernels/: the CUDA image-prep kernel compiles with nvcc (when nvcc exists), and its CPU reference
// (kernels/image-prep-ref.cpp, built here with g++ into a temp folder with the kernels/test/ref-check
// driver) is checked element by element against an independent TypeScript model of the same
// steps (Pillow bicubic resample, llama.cpp's PAD_CEIL fit, CLIP normalization, and HF's
// reshape + transpose(0,3,6,4,7,2,1,5,8) done generically), and its resize against Pillow's own
// output (known values below, made once with Pillow 12.3 by the generator quoted in PILLOW_CASES).
import t from 'tap';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { lcgImage, PILLOW_CASES } from './helpers/pillow-cases.js';

const run = promisify(execFile);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const kernels = path.join(root, 'kernels');
const PAD = 0;
const STRETCH = 1;

// ---------------------------------------------------------------- the independent model


function bicubic(x: number): number {
  const a = -0.5;
  x = Math.abs(x);
  if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
  if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
  return 0;
}

/** Pillow's precompute_coeffs + normalize_coeffs_8bpc (Resample.c) for the bicubic filter. */
function coeffs(inSize: number, outSize: number): { ksize: number; bounds: number[]; weights: number[] } {
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1);
  const support = 2 * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds: number[] = [];
  const weights: number[] = [];
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const ss = 1 / filterscale;
    const xmin = Math.max(0, Math.trunc(center - support + 0.5));
    const xmax = Math.min(inSize, Math.trunc(center + support + 0.5)) - xmin;
    const k: number[] = [];
    let ww = 0;
    for (let x = 0; x < xmax; x++) {
      const w = bicubic((x + xmin - center + 0.5) * ss);
      k.push(w);
      ww += w;
    }
    for (let x = 0; x < ksize; x++) {
      const w = x < xmax ? (ww !== 0 ? k[x] / ww : k[x]) : 0;
      weights.push(Math.trunc(w * 2 ** 22 + (w < 0 ? -0.5 : 0.5)));
    }
    bounds.push(xmin, xmax);
  }
  return { ksize, bounds, weights };
}

const clip8 = (v: number) => Math.min(255, Math.max(0, Math.floor(v / 2 ** 22)));

/** Separable resample, horizontal pass first, uint8 in between (Pillow ImagingResample). */
function resizeStretch(src: Buffer, w: number, h: number, ow: number, oh: number): Buffer {
  if (w === ow && h === oh) return Buffer.from(src);
  let cur = src;
  if (ow !== w) {
    const { ksize, bounds, weights } = coeffs(w, ow);
    const out = Buffer.alloc(ow * h * 3);
    for (let y = 0; y < h; y++)
      for (let x = 0; x < ow; x++)
        for (let c = 0; c < 3; c++) {
          let s = 2 ** 21;
          for (let i = 0; i < bounds[2 * x + 1]; i++) s += cur[(y * w + bounds[2 * x] + i) * 3 + c] * weights[x * ksize + i];
          out[(y * ow + x) * 3 + c] = clip8(s);
        }
    cur = out;
  }
  if (oh !== h) {
    const { ksize, bounds, weights } = coeffs(h, oh);
    const out = Buffer.alloc(ow * oh * 3);
    for (let y = 0; y < oh; y++)
      for (let x = 0; x < ow; x++)
        for (let c = 0; c < 3; c++) {
          let s = 2 ** 21;
          for (let i = 0; i < bounds[2 * y + 1]; i++) s += cur[((bounds[2 * y] + i) * ow + x) * 3 + c] * weights[y * ksize + i];
          out[(y * ow + x) * 3 + c] = clip8(s);
        }
    cur = out;
  }
  return cur;
}

const f32 = Math.fround;

/** llama.cpp img_tool::resize PAD_CEIL in f32 arithmetic. */
function padPlan(w: number, h: number, ow: number, oh: number) {
  if (w === ow && h === oh) return { fitW: ow, fitH: oh, offX: 0, offY: 0 };
  const scale = Math.min(f32(ow / w), f32(oh / h));
  const fitW = Math.min(Math.ceil(f32(w * scale)), ow);
  const fitH = Math.min(Math.ceil(f32(h * scale)), oh);
  return { fitW, fitH, offX: Math.trunc((ow - fitW) / 2), offY: Math.trunc((oh - fitH) / 2) };
}

function canvasFor(src: Buffer, w: number, h: number, ow: number, oh: number, mode: number): Buffer {
  const p = mode === PAD ? padPlan(w, h, ow, oh) : { fitW: ow, fitH: oh, offX: 0, offY: 0 };
  const fit = resizeStretch(src, w, h, p.fitW, p.fitH);
  const out = Buffer.alloc(ow * oh * 3); // black
  for (let y = 0; y < p.fitH; y++) fit.copy(out, ((y + p.offY) * ow + p.offX) * 3, y * p.fitW * 3, (y + 1) * p.fitW * 3);
  return out;
}

const MEAN = [0.48145466, 0.4578275, 0.40821073].map(f32);
const STD = [0.26862954, 0.26130258, 0.27577711].map(f32);
const norm = (v: number, c: number) => f32(f32(f32(v / 255) - MEAN[c]) / STD[c]);

function chwOf(canvas: Buffer, ow: number, oh: number): Float32Array {
  const out = new Float32Array(3 * ow * oh);
  for (let c = 0; c < 3; c++) for (let i = 0; i < ow * oh; i++) out[c * ow * oh + i] = norm(canvas[i * 3 + c], c);
  return out;
}

/** numpy's reshape (contiguous) + transpose(perm) + flatten, generically. */
function transpose(data: Float32Array, shape: number[], perm: number[]): Float32Array {
  const strides = shape.map((_, i) => shape.slice(i + 1).reduce((a, b) => a * b, 1));
  const oshape = perm.map((p) => shape[p]);
  const ostrides = perm.map((p) => strides[p]);
  const out = new Float32Array(data.length);
  const idx = new Array(oshape.length).fill(0);
  for (let o = 0; o < out.length; o++) {
    let off = 0;
    for (let k = 0; k < idx.length; k++) off += idx[k] * ostrides[k];
    out[o] = data[off];
    for (let k = idx.length - 1; k >= 0; k--) {
      if (++idx[k] < oshape[k]) break;
      idx[k] = 0;
    }
  }
  return out;
}

/** Qwen2VLImageProcessor._preprocess for one image: tile to 2 frames, reshape, transpose, flatten. */
function hfPatches(chw: Float32Array, ow: number, oh: number): Float32Array {
  const frames = new Float32Array(chw.length * 2);
  frames.set(chw, 0);
  frames.set(chw, chw.length);
  const gh = oh / 14, gw = ow / 14;
  return transpose(frames, [1, 2, 3, gh / 2, 2, 14, gw / 2, 2, 14], [0, 3, 6, 4, 7, 2, 1, 5, 8]);
}

/** llama.cpp calc_size_preserved_ratio (align 28) in f32 arithmetic, std::round = half away from zero. */
function llamaTarget(w: number, h: number, minPx: number, maxPx: number): [number, number] {
  const F = 28;
  const roundBy = (x: number) => Math.round(f32(f32(x) / F)) * F; // x > 0: Math.round == std::round
  const ceilBy = (x: number) => Math.ceil(f32(f32(x) / F)) * F;
  const floorBy = (x: number) => Math.floor(f32(f32(x) / F)) * F;
  let wb = Math.max(F, roundBy(w));
  let hb = Math.max(F, roundBy(h));
  if (maxPx > 0 && wb * hb > maxPx) {
    const beta = f32(Math.sqrt(f32(f32(h * w) / maxPx)));
    hb = Math.max(F, floorBy(f32(h / beta)));
    wb = Math.max(F, floorBy(f32(w / beta)));
  } else if (minPx > 0 && wb * hb < minPx) {
    const beta = f32(Math.sqrt(f32(minPx / f32(h * w))));
    hb = ceilBy(f32(h * beta));
    wb = ceilBy(f32(w * beta));
  }
  return [wb, hb];
}

// ---------------------------------------------------------------- helpers

function findNvcc(): string | null {
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    if (dir && existsSync(path.join(dir, 'nvcc'))) return path.join(dir, 'nvcc');
  }
  for (const p of [process.env.CUDA_HOME && path.join(process.env.CUDA_HOME, 'bin', 'nvcc'), '/usr/local/cuda/bin/nvcc']) {
    if (p && existsSync(p)) return p;
  }
  return null;
}

function firstDiff(a: ArrayLike<number>, b: ArrayLike<number>): { count: number; first: number; maxAbs: number } {
  let count = 0, first = -1, maxAbs = 0;
  for (let i = 0; i < Math.max(a.length, b.length); i++) {
    if (!Object.is(a[i], b[i])) {
      count++;
      if (first < 0) first = i;
      maxAbs = Math.max(maxAbs, Math.abs(a[i] - b[i]) || Infinity);
    }
  }
  return { count, first, maxAbs };
}

const tmp = mkdtempSync(path.join(os.tmpdir(), 'caprl-kernels-'));
t.teardown(() => rmSync(tmp, { recursive: true, force: true }));
const refCheck = path.join(tmp, 'ref-check');
let refBuild: Promise<unknown> | null = null;
const buildRef = () =>
  (refBuild ??= run('g++', ['-std=c++17', '-O2', '-Wall', '-Wextra', '-Werror', '-o', refCheck,
    path.join(kernels, 'test', 'ref-check.cpp'), path.join(kernels, 'image-prep-ref.cpp')]));

async function refPrep(img: Buffer, w: number, h: number, ow: number, oh: number, mode: number, layouts = 'both') {
  const name = `img-${w}x${h}-${ow}x${oh}-${mode}-${layouts}`;
  const input = path.join(tmp, `${name}.rgb`);
  writeFileSync(input, img);
  const prefix = path.join(tmp, name);
  const { stdout } = await run(refCheck, ['prep', input, String(w), String(h), String(ow), String(oh), String(mode), prefix, layouts]);
  const [rc, fitW, fitH, offX, offY] = stdout.trim().split(' ').map(Number);
  const readF32 = (ext: string) => {
    const p = `${prefix}.${ext}`;
    if (rc !== 0 || !existsSync(p)) return null;
    const b = readFileSync(p);
    return new Float32Array(b.buffer, b.byteOffset, b.length / 4);
  };
  return {
    rc, plan: { fitW, fitH, offX, offY },
    u8: rc === 0 ? readFileSync(`${prefix}.u8`) : null,
    chw: readF32('chw'), patches: readF32('patches'),
  };
}

const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

// ---------------------------------------------------------------- tests

const nvcc = findNvcc();
t.test('kernels/*.cu compile with nvcc for sm_90a, gpu-check links', { skip: nvcc ? false : 'nvcc not found on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin: CUDA kernels not compiled' }, async (t) => {
  const nv = nvcc as string;
  const o = (n: string) => path.join(tmp, n);
  const common = ['-std=c++17', '-O2', '-arch=sm_90a', '-I', kernels, '-Xcompiler', '-Wall', '-Werror', 'all-warnings'];
  await Promise.all([
    run(nv, [...common, '-c', path.join(kernels, 'image-prep.cu'), '-o', o('image-prep.o')]),
    run(nv, [...common, '-c', path.join(kernels, 'test', 'gpu-check.cu'), '-o', o('gpu-check.o')]),
  ]);
  t.ok(existsSync(o('image-prep.o')), 'nvcc -c kernels/image-prep.cu');
  await run(nv, ['-std=c++17', '-O2', '-arch=sm_90a', o('image-prep.o'), o('gpu-check.o'), path.join(kernels, 'image-prep-ref.cpp'), '-o', o('gpu-check')]);
  // Without a GPU (CI) the checker must say so and exit 2; with one it must pass on a small case.
  const res = await run(o('gpu-check'), ['--iters', '1', '--sizes', '61x45,300x200']).then(
    (r) => ({ code: 0, out: r.stdout }),
    (e: { code: number; stdout: string }) => ({ code: e.code, out: e.stdout }),
  );
  if (res.code === 2) t.match(res.out, /no CUDA device/, 'gpu-check reports the missing device');
  else t.equal(res.code, 0, `gpu-check on a real device: ${res.out}`);
});

t.test('reference: Pillow bicubic coefficients', async (t) => {
  await buildRef();
  for (const [inS, outS] of [[10, 4], [4, 10], [1000, 1008], [1536, 1533], [4000, 2044], [7, 1], [1, 28], [517, 504], [333, 336]]) {
    const { stdout } = await run(refCheck, ['coeffs', String(inS), String(outS)]);
    const [k, b, w] = stdout.trim().split('\n');
    const mine = coeffs(inS, outS);
    t.equal(Number(k), mine.ksize, `ksize ${inS}->${outS}`);
    t.same(b.split(' ').map(Number), mine.bounds, `bounds ${inS}->${outS}`);
    t.same(w.split(' ').map(Number), mine.weights, `weights ${inS}->${outS}`);
  }
});


t.test('reference: resize equals Pillow BICUBIC (known values) and the TS model', async (t) => {
  await buildRef();
  for (const [w, h, ow, oh, hash] of PILLOW_CASES) {
    const img = lcgImage(w, h);
    const ref = await refPrep(img, w, h, ow, oh, STRETCH, 'chw');
    t.equal(ref.rc, 0, `rc ${w}x${h}->${ow}x${oh}`);
    t.equal(sha256(ref.u8!), hash, `reference == Pillow ${w}x${h}->${ow}x${oh}`);
    t.equal(sha256(resizeStretch(img, w, h, ow, oh)), hash, `TS model == Pillow ${w}x${h}->${ow}x${oh}`);
  }
});

t.test('reference: canvas, CHW and HF patches equal the TS model element by element', async (t) => {
  await buildRef();
  const cases: [number, number, number, number][] = [];
  for (const [w, h] of [[37, 23], [333, 517], [1000, 700], [640, 480], [61, 200], [56, 84], [29, 1], [300, 299]]) {
    const [ow, oh] = llamaTarget(w, h, 8 * 784, 4096 * 784);
    cases.push([w, h, ow, oh]);
  }
  cases.push([900, 150, 280, 56], [45, 47, 28, 28], [200, 100, 56, 308]);
  for (const [w, h, ow, oh] of cases) {
    const img = lcgImage(w, h);
    for (const mode of [PAD, STRETCH]) {
      const label = `${w}x${h} -> ${ow}x${oh} ${mode === PAD ? 'pad' : 'stretch'}`;
      const ref = await refPrep(img, w, h, ow, oh, mode);
      t.equal(ref.rc, 0, `rc ${label}`);
      const plan = mode === PAD ? padPlan(w, h, ow, oh) : { fitW: ow, fitH: oh, offX: 0, offY: 0 };
      t.same(ref.plan, plan, `plan ${label}`);
      const canvas = canvasFor(img, w, h, ow, oh, mode);
      t.ok(ref.u8!.equals(canvas), `uint8 canvas ${label}`);
      const chw = chwOf(canvas, ow, oh);
      const patches = hfPatches(chw, ow, oh);
      t.equal(ref.chw!.length, 3 * ow * oh, `chw length ${label}`);
      t.equal(ref.patches!.length, (ow / 14) * (oh / 14) * 1176, `patches length ${label}`);
      t.notOk(ref.chw!.some(Number.isNaN) || ref.patches!.some(Number.isNaN), `every element written ${label}`);
      t.same(firstDiff(ref.chw!, chw), { count: 0, first: -1, maxAbs: 0 }, `chw exact ${label}`);
      t.same(firstDiff(ref.patches!, patches), { count: 0, first: -1, maxAbs: 0 }, `patches exact ${label}`);
    }
  }
  // Padding is black before normalization: the corners of 1000x700 -> 1008x700 pad are (0 - mean) / std.
  const ref = await refPrep(lcgImage(1000, 700), 1000, 700, 1008, 700, PAD, 'chw');
  t.same(ref.plan, { fitW: 1000, fitH: 700, offX: 4, offY: 0 }, 'llama.cpp centres 1000x700 on 1008x700');
  for (let c = 0; c < 3; c++) t.equal(ref.chw![c * 1008 * 700], norm(0, c), `pad value channel ${c}`);
});

t.test('reference: normalization table and llama.cpp target sizes', async (t) => {
  await buildRef();
  const { stdout } = await run(refCheck, ['lut']);
  const bits = new Uint32Array(stdout.trim().split(' ').map(Number));
  const lut = new Float32Array(bits.buffer);
  const mine = new Float32Array(768);
  for (let c = 0; c < 3; c++) for (let v = 0; v < 256; v++) mine[c * 256 + v] = norm(v, c);
  t.same(firstDiff(lut, mine).count, 0, 'all 768 normalized values exact');
  t.ok(Math.abs(lut[255] - (1 - 0.48145466) / 0.26862954) < 1e-6 && Math.abs(lut[0] + 0.48145466 / 0.26862954) < 1e-6, 'R range');

  const sizes: [number, number][] = [[1024, 1024], [1000, 700], [2048, 1536], [4000, 3000], [1280, 720], [448, 448],
    [70, 70], [42, 98], [37, 53], [1, 1], [10000, 50], [50, 5000], [3, 3000], [1792, 1792], [1806, 1806], [224, 224]];
  const lim: [number, number][] = [[8 * 784, 4096 * 784], [3136, 12845056], [0, 0]];
  const input = sizes.flatMap(([w, h]) => lim.map(([a, b]) => `${w} ${h} ${a} ${b}`)).join('\n') + '\n';
  const child = execFile(refCheck, ['target']);
  child.stdin!.end(input);
  let out = '';
  child.stdout!.on('data', (d) => (out += d));
  await new Promise((r) => child.on('close', r));
  const lines = out.trim().split('\n');
  let i = 0;
  for (const [w, h] of sizes)
    for (const [a, b] of lim) {
      const [rc, ow, oh] = lines[i++].split(' ').map(Number);
      t.same([rc, ow, oh], [0, ...llamaTarget(w, h, a, b)], `target ${w}x${h} limits ${a}..${b}`);
    }
  // Known values (llama.cpp limits): what the benchmark's images become.
  t.same(llamaTarget(1024, 1024, 6272, 3211264), [1036, 1036]);
  t.same(llamaTarget(2048, 1536, 6272, 3211264), [2044, 1540]);
  t.same(llamaTarget(1280, 720, 6272, 3211264), [1288, 728]);
  t.same(llamaTarget(70, 70, 0, 0), [84, 84], 'std::round: 2.5 rounds away from zero (HF rounds to even: 56)');
});

t.test('reference: invalid arguments are refused', async (t) => {
  await buildRef();
  const img = lcgImage(30, 30);
  t.equal((await refPrep(img, 30, 30, 50, 56, PAD, 'patches')).rc, -1, 'patches need a 28-multiple canvas');
  t.equal((await refPrep(img, 30, 30, 50, 75, PAD, 'chw')).rc, 0, 'chw alone takes any canvas');
  t.equal((await refPrep(img, 30, 30, 56, 56, 7)).rc, -1, 'unknown mode');
  const child = execFile(refCheck, ['plan']);
  child.stdin!.end('0 5 28 28 0\n5 5 0 28 1\n5 5 70000 28 1\n5 5 28 28 1\n');
  let out = '';
  child.stdout!.on('data', (d) => (out += d));
  await new Promise((r) => child.on('close', r));
  t.same(out.trim().split('\n').map((l) => Number(l.split(' ')[0])), [-1, -1, -1, 0]);
});
