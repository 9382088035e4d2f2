// GGUF writer/reader round trip and the F16/BF16/Q8_0 encodings.
import t from 'tap';
import { mkdtemp, rm, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  bf16BitsToF32,
  dequantizeQ8_0,
  f16BitsToF32,
  f32ToBf16Bits,
  f32ToF16Bits,
  quantizeQ8_0,
  Q8_0_BLOCK_BYTES,
} from '../src/model/encodings.js';
import { GGUFMetadata, GGUFValueType, GGMLType, tensorByteSize } from '../src/model/gguf.js';
import { GGUFWriter } from '../src/model/gguf-writer.js';
import { readGGUF, readTensorBytes, readTensorF32 } from '../src/model/gguf-reader.js';
import { Xoshiro128, standardNormalTable } from '../src/model/prng.js';

t.test('f16 encoding', async (t) => {
  const cases: Array<[number, number]> = [
    [0, 0x0000],
    [-0, 0x8000],
    [1, 0x3c00],
    [-2, 0xc000],
    [0.5, 0x3800],
    [65504, 0x7bff],
    [65520, 0x7c00], // rounds up to Inf
    [Infinity, 0x7c00],
    [-Infinity, 0xfc00],
    [2 ** -24, 0x0001], // smallest subnormal
    [2 ** -25, 0x0000], // tie → even (0)
    [1.5 * 2 ** -25, 0x0001],
    [2 ** -14, 0x0400], // smallest normal
    [1 + 2 ** -11, 0x3c00], // tie → even
    [1 + 3 * 2 ** -11, 0x3c02], // tie → even (up)
    [0.1, 0x2e66],
  ];
  for (const [x, bits] of cases) t.equal(f32ToF16Bits(x), bits, `f16(${x})`);
  t.ok(Number.isNaN(f16BitsToF32(f32ToF16Bits(NaN))), 'NaN stays NaN');
  // Every finite half value round-trips exactly.
  let bad = 0;
  for (let h = 0; h < 0x10000; h++) {
    if ((h & 0x7c00) === 0x7c00) continue;
    if (f32ToF16Bits(f16BitsToF32(h)) !== h) bad++;
  }
  t.equal(bad, 0, 'all finite halves round-trip');
});

t.test('bf16 encoding', async (t) => {
  t.equal(f32ToBf16Bits(1), 0x3f80);
  t.equal(f32ToBf16Bits(-2), 0xc000);
  t.equal(f32ToBf16Bits(1 + 2 ** -8), 0x3f80, 'tie → even');
  t.equal(f32ToBf16Bits(1 + 3 * 2 ** -8), 0x3f82, 'tie → even (up)');
  const rng = new Xoshiro128(7, 'bf16');
  for (let i = 0; i < 1000; i++) {
    const x = (rng.nextFloat() - 0.5) * 10;
    const y = bf16BitsToF32(f32ToBf16Bits(x));
    if (Math.abs(y - x) > Math.abs(x) * 2 ** -8) t.fail(`bf16(${x}) = ${y}`);
  }
});

t.test('q8_0 round trip', async (t) => {
  const n = 32 * 64;
  const src = new Float32Array(n);
  const rng = new Xoshiro128(3, 'q8');
  const tbl = standardNormalTable();
  for (let i = 0; i < n; i++) src[i] = tbl[rng.nextU32() & 0xffff] * 0.05;
  src.fill(0, 64, 96); // an all-zero block
  const q = new Uint8Array((n / 32) * Q8_0_BLOCK_BYTES);
  quantizeQ8_0(src, 0, n, q, 0);
  const back = new Float32Array(n);
  dequantizeQ8_0(q, 0, n, back);
  let worst = 0;
  for (let b = 0; b < n / 32; b++) {
    let amax = 0;
    for (let j = 0; j < 32; j++) amax = Math.max(amax, Math.abs(src[b * 32 + j]));
    const d = amax / 127;
    for (let j = 0; j < 32; j++) worst = Math.max(worst, Math.abs(back[b * 32 + j] - src[b * 32 + j]) / (d || 1));
  }
  // Error is at most half a step, plus the f16 rounding of the scale (≤ 127 * 2^-11 steps).
  t.ok(worst <= 0.5 + 127 * 2 ** -11 + 1e-6, `max error ${worst.toFixed(4)} steps`);
  for (let j = 64; j < 96; j++) t.equal(back[j], 0);
  // Block layout: f16 scale then int8s; the largest magnitude quantizes to ±127.
  const d = f16BitsToF32(q[0] | (q[1] << 8));
  t.ok(d > 0);
  let maxq = 0;
  for (let j = 0; j < 32; j++) maxq = Math.max(maxq, Math.abs((q[2 + j] << 24) >> 24));
  t.equal(maxq, 127);
  t.throws(() => quantizeQ8_0(src, 0, 31, q, 0));
  // Ties round half away from zero (C roundf), as ggml's reference and gguf-py do.
  const ties = new Float32Array(32).map((_, i) => i - 16 + 0.5);
  ties[31] = 127; // amax 127 → d = 1
  const tq = new Uint8Array(Q8_0_BLOCK_BYTES);
  quantizeQ8_0(ties, 0, 32, tq, 0);
  const got = [...new Int8Array(tq.buffer, 2, 32)];
  const want = [...ties].map((x) => (x < 0 ? -Math.round(-x) : Math.round(x)));
  t.same(got, want, 'ties away from zero');
  t.equal(got[0], -16, '-15.5 → -16');
  t.equal(got[16], 1, '0.5 → 1');
});

t.test('GGUF write/read round trip', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'caprl-gguf-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const path = join(dir, 'x.gguf');
  const meta = new GGUFMetadata()
    .str('general.architecture', 'test')
    .u32('general.alignment', 64)
    .set('k.u8', { type: GGUFValueType.UINT8, value: 200 })
    .set('k.i8', { type: GGUFValueType.INT8, value: -100 })
    .set('k.u16', { type: GGUFValueType.UINT16, value: 60000 })
    .set('k.i16', { type: GGUFValueType.INT16, value: -30000 })
    .u32('k.u32', 4000000000)
    .i32('k.i32', -5)
    .f32('k.f32', 1e-6)
    .bool('k.bool', true)
    .str('k.str', 'héllo <|im_end|>')
    .u64('k.u64', 2n ** 40n)
    .set('k.i64', { type: GGUFValueType.INT64, value: -(2n ** 40n) })
    .f64('k.f64', Math.PI)
    .arr('k.arr.str', GGUFValueType.STRING, ['a', '', 'Ġthe'])
    .arr('k.arr.i32', GGUFValueType.INT32, [16, 24, 24, 0])
    .arr('k.arr.f32', GGUFValueType.FLOAT32, [0.5, 0.25])
    .arr('k.arr.bool', GGUFValueType.BOOL, [true, false]);
  const tensors = [
    { name: 'a', shape: [3], type: GGMLType.F32 },
    { name: 'b', shape: [64, 2], type: GGMLType.Q8_0 },
    { name: 'c', shape: [5, 1, 1, 3], type: GGMLType.F16 },
    { name: 'd', shape: [2, 2], type: GGMLType.BF16 },
  ];
  const w = await GGUFWriter.create(path, meta, tensors);
  await w.writeTensor('a', [new Uint8Array(new Float32Array([1, 2, 3]).buffer)]);
  const bvals = new Float32Array(128).map((_, i) => (i - 64) / 10);
  const bq = new Uint8Array(4 * Q8_0_BLOCK_BYTES);
  quantizeQ8_0(bvals, 0, 128, bq, 0);
  await w.writeTensor('b', [bq.subarray(0, 50), bq.subarray(50)]);
  await t.rejects(w.writeTensor('d', []), /expected tensor c/);
  const c16 = new Uint16Array(15).map((_, i) => f32ToF16Bits(i));
  await t.rejects(w.writeTensor('c', [new Uint8Array(c16.buffer).subarray(0, 10)]), /gave 10 bytes, expected 30/);
  await w.abort();

  const w2 = await GGUFWriter.create(path, meta, tensors);
  await w2.writeTensor('a', [new Uint8Array(new Float32Array([1, 2, 3]).buffer)]);
  await w2.writeTensor('b', [bq]);
  await w2.writeTensor('c', (async function* () {
    yield new Uint8Array(c16.buffer);
  })());
  await w2.writeTensor('d', [new Uint8Array(new Uint16Array([0x3f80, 0xc000, 0, 0x4040]).buffer)]);
  await w2.finish();

  const f = await readGGUF(path);
  t.equal(f.version, 3);
  t.equal(f.alignment, 64);
  t.equal(f.dataOffset % 64, 0);
  for (const [k, v] of meta.entries) t.same(f.metadata.get(k), k === 'k.f32' ? { ...v, value: Math.fround(1e-6) } : v, k);
  t.same(
    f.tensors.map((x) => [x.name, x.shape, x.type]),
    tensors.map((x) => [x.name, x.shape, x.type]),
  );
  for (const x of f.tensors) t.equal(x.offset % 64, 0, `${x.name} aligned`);
  t.same([...(await readTensorF32(f, 'a'))], [1, 2, 3]);
  const b = await readTensorF32(f, 'b');
  for (let i = 0; i < 128; i++) if (Math.abs(b[i] - bvals[i]) > 0.03) t.fail(`b[${i}]`);
  t.same([...(await readTensorF32(f, 'c'))], [...Array(15).keys()]);
  t.same([...(await readTensorF32(f, 'd'))], [1, -2, 0, 3]);
  t.equal((await readTensorBytes(f, 'b')).length, tensorByteSize([64, 2], GGMLType.Q8_0));
  const bytes = await readFile(path);
  t.equal(bytes.readUInt32LE(0), 0x46554747, 'magic');
  const last = f.tensors[3];
  t.equal(bytes.length, f.dataOffset + Math.ceil((last.offset + last.byteSize) / 64) * 64, 'file ends padded');
});

t.test('prng is deterministic and keyed', async (t) => {
  const a = new Xoshiro128(42, 'x');
  const b = new Xoshiro128(42, 'x');
  const c = new Xoshiro128(42, 'y');
  const d = new Xoshiro128(43, 'x');
  const va = [a.nextU32(), a.nextU32(), a.nextU32()];
  t.same([b.nextU32(), b.nextU32(), b.nextU32()], va);
  t.not(c.nextU32(), va[0]);
  t.not(d.nextU32(), va[0]);
  const buf = new Uint32Array(3);
  new Xoshiro128(42, 'x').fillU32(buf);
  t.same([...buf], va, 'fillU32 matches nextU32');
  const tbl = standardNormalTable();
  let m = 0, v = 0;
  for (const x of tbl) { m += x; v += x * x; }
  t.ok(Math.abs(m / tbl.length) < 1e-6, 'table mean 0');
  t.ok(Math.abs(v / tbl.length - 1) < 0.01, 'table variance ~1');
});
