// Element conversion (every 16-bit pattern against the f32 route llama.cpp's converter takes) and
// the safetensors writer/reader.
import t from 'tap';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { convertElements, ConvertScratch } from '../src/convert/dtype.js';
import { createSafetensors, readSafetensorsHeader } from '../src/convert/safetensors.js';
import { bf16BitsToF32, f16BitsToF32, f32ToBf16Bits, f32ToF16Bits, quantizeQ8_0 } from '../src/model/encodings.js';
import { GGMLType } from '../src/model/gguf.js';

const all16 = () => Uint16Array.from({ length: 65536 }, (_, i) => i);
const bytes = (a: ArrayBufferView) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

t.test('16-bit conversions equal widening to f32 then rounding', async (t) => {
  const sc = new ConvertScratch(65536);
  const src = all16();
  const cases: Array<[ 'F16' | 'BF16', GGMLType, (b: number) => number, (x: number) => number]> = [
    ['BF16', GGMLType.F16, bf16BitsToF32, f32ToF16Bits],
    ['F16', GGMLType.BF16, f16BitsToF32, f32ToBf16Bits],
  ];
  for (const [from, to, widen, round] of cases) {
    const got = new Uint16Array(convertElements(bytes(src), from, 65536, to, sc).slice().buffer);
    let bad = 0;
    for (let i = 0; i < 65536; i++) if (!Number.isNaN(widen(i)) && got[i] !== round(widen(i))) bad++;
    t.equal(bad, 0, `${from} -> ${GGMLType[to]}: all non-NaN patterns`);
  }
  const f32 = new Float32Array(convertElements(bytes(src), 'BF16', 65536, GGMLType.F32, sc).slice().buffer);
  t.ok(f32.every((x, i) => Object.is(x, bf16BitsToF32(i)) || Number.isNaN(x)), 'BF16 -> F32 exact');
  t.equal(convertElements(bytes(src), 'F16', 10, GGMLType.F16, sc).buffer, src.buffer, 'same type: no copy');
});

t.test('F32 sources, Q8_0', async (t) => {
  const sc = new ConvertScratch(1024);
  const x = Float32Array.from({ length: 1024 }, (_, i) => Math.sin(i) * (i % 7));
  const f16 = new Uint16Array(convertElements(bytes(x), 'F32', 1024, GGMLType.F16, sc).slice().buffer);
  t.ok(f16.every((h, i) => h === f32ToF16Bits(x[i])));
  const q = convertElements(bytes(x), 'F32', 1024, GGMLType.Q8_0, sc).slice();
  const want = new Uint8Array(32 * 34);
  quantizeQ8_0(x, 0, 1024, want, 0);
  t.same(q, want, 'ggml reference Q8_0');
  t.throws(() => convertElements(bytes(x), 'F32', 33, GGMLType.Q8_0, sc), /not a multiple of 32/);
});

t.test('safetensors: write, read back, 8-byte aligned data', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'caprl-st-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const p = join(dir, 'x.safetensors');
  const w = await createSafetensors(p, [
    { name: 'a', dtype: 'BF16', shape: [2, 3, 2, 1, 1] },
    { name: 'b.bias', dtype: 'F32', shape: [3] },
  ], { format: 'pt' });
  await w.writeTensor('a', [Uint8Array.from({ length: 24 }, (_, i) => i)]);
  await w.writeTensor('b.bias', [bytes(Float32Array.of(1, 2, 3))]);
  await w.finish();
  const h = await readSafetensorsHeader(p);
  t.same(h.metadata, { format: 'pt' });
  t.same(h.tensors.get('a'), { name: 'a', dtype: 'BF16', shape: [2, 3, 2, 1, 1], start: h.raw.length, byteSize: 24 });
  t.equal(h.raw.length % 8, 0, 'data starts 8-byte aligned');
  const raw = await readFile(p);
  const b = h.tensors.get('b.bias')!;
  t.same([...new Float32Array(raw.buffer.slice(raw.byteOffset + b.start, raw.byteOffset + b.start + 12))], [1, 2, 3]);
  t.equal(h.size, raw.length);
});
