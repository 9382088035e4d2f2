// Turns a planned tensor into a stream of encoded byte chunks.
//
// Values are drawn in fixed-size chunks of CHUNK_ELEMS elements from the tensor's own PRNG
// stream: one 32-bit draw per two elements, each 16-bit half indexing the normal table. The
// stream does not depend on the output type, so an f16 and a q8_0 file of the same seed hold
// the same underlying weights (up to rounding). Hot loops are table lookups on typed arrays.

import { endianness } from 'node:os';
import { GGMLType, GGML_TYPE_TRAITS, elementCount } from './gguf.js';
import { f32ToBf16Bits, f32ToF16Bits, quantizeQ8_0, Q8_0_BLOCK_BYTES, QK8_0 } from './encodings.js';
import { Xoshiro128, standardNormalTable } from './prng.js';
import type { PlannedTensor } from './qwen25vl.js';

if (endianness() !== 'LE') throw new Error('the GGUF generator assumes a little-endian host');

/** Elements per chunk: a multiple of 2 (draw pairs) and of 32 (Q8_0 blocks). 4 Mi elements. */
export const CHUNK_ELEMS = 1 << 22;

const f16Tables = new Map<number, Uint16Array>();
const bf16Tables = new Map<number, Uint16Array>();
const f32Tables = new Map<number, Float32Array>();

function f32Table(std: number): Float32Array {
  let t = f32Tables.get(std);
  if (!t) {
    const base = standardNormalTable();
    t = new Float32Array(65536);
    for (let i = 0; i < 65536; i++) t[i] = base[i] * std;
    f32Tables.set(std, t);
  }
  return t;
}
function f16Table(std: number): Uint16Array {
  let t = f16Tables.get(std);
  if (!t) {
    const src = f32Table(std);
    t = new Uint16Array(65536);
    for (let i = 0; i < 65536; i++) t[i] = f32ToF16Bits(src[i]);
    f16Tables.set(std, t);
  }
  return t;
}
function bf16Table(std: number): Uint16Array {
  let t = bf16Tables.get(std);
  if (!t) {
    const src = f32Table(std);
    t = new Uint16Array(65536);
    for (let i = 0; i < 65536; i++) t[i] = f32ToBf16Bits(src[i]);
    bf16Tables.set(std, t);
  }
  return t;
}

/** Reusable scratch and double output buffers, shared by all tensors of a generation run. */
export class ChunkBuffers {
  readonly idx32 = new Uint32Array(CHUNK_ELEMS / 2);
  readonly idx16 = new Uint16Array(this.idx32.buffer);
  readonly vals = new Float32Array(CHUNK_ELEMS);
  // Largest encoded chunk: F32, 4 bytes per element.
  readonly out = [new Uint8Array(CHUNK_ELEMS * 4), new Uint8Array(CHUNK_ELEMS * 4)];
}

/**
 * Encoded data of `t` as chunks (alternating between the two output buffers of `bufs`;
 * see ChunkSource in gguf-writer.ts for why that is safe). Deterministic in (seed, t.name).
 */
export function* tensorChunks(t: PlannedTensor, seed: number, bufs: ChunkBuffers): Generator<Uint8Array> {
  const n = elementCount(t.shape);
  const rowLen = t.shape[0];
  const tr = GGML_TYPE_TRAITS[t.type];
  if (!tr) throw new Error(`${t.name}: unsupported type ${t.type}`);
  const rng = t.init.kind === 'normal' ? new Xoshiro128(seed, t.name) : undefined;
  let which = 0;
  for (let start = 0; start < n; start += CHUNK_ELEMS) {
    const len = Math.min(CHUNK_ELEMS, n - start);
    const outBytes = bufs.out[which];
    which ^= 1;
    if (t.init.kind === 'const') {
      bufs.vals.fill(t.init.value, 0, len);
      yield encodeFromF32(t, bufs.vals, len, outBytes);
      continue;
    }
    rng!.fillU32(bufs.idx32, (len + 1) >>> 1);
    const { std, rowScales } = t.init;
    const idx = bufs.idx16;
    // Row segments of this chunk with their std (rows differ only where rowScales says so).
    const segs: Array<[number, number, number]> = [];
    if (rowScales && rowScales.size) {
      let a = 0;
      while (a < len) {
        const row = Math.floor((start + a) / rowLen);
        const rowEnd = Math.min(len, (row + 1) * rowLen - start);
        const s = std * (rowScales.get(row) ?? 1);
        const last = segs[segs.length - 1];
        if (last && last[2] === s && last[1] === a) last[1] = rowEnd;
        else segs.push([a, rowEnd, s]);
        a = rowEnd;
      }
    } else segs.push([0, len, std]);

    if (t.type === GGMLType.F16 || t.type === GGMLType.BF16) {
      const o16 = new Uint16Array(outBytes.buffer, outBytes.byteOffset, len);
      for (const [a, b, s] of segs) {
        const tbl = t.type === GGMLType.F16 ? f16Table(s) : bf16Table(s);
        for (let i = a; i < b; i++) o16[i] = tbl[idx[i]];
      }
      yield outBytes.subarray(0, len * 2);
    } else {
      const vals = bufs.vals;
      for (const [a, b, s] of segs) {
        const tbl = f32Table(s);
        for (let i = a; i < b; i++) vals[i] = tbl[idx[i]];
      }
      yield encodeFromF32(t, vals, len, outBytes);
    }
  }
}

function encodeFromF32(t: PlannedTensor, vals: Float32Array, len: number, outBytes: Uint8Array): Uint8Array {
  switch (t.type) {
    case GGMLType.F32: {
      new Float32Array(outBytes.buffer, outBytes.byteOffset, len).set(vals.subarray(0, len));
      return outBytes.subarray(0, len * 4);
    }
    case GGMLType.F16: {
      const o = new Uint16Array(outBytes.buffer, outBytes.byteOffset, len);
      for (let i = 0; i < len; i++) o[i] = f32ToF16Bits(vals[i]);
      return outBytes.subarray(0, len * 2);
    }
    case GGMLType.BF16: {
      const o = new Uint16Array(outBytes.buffer, outBytes.byteOffset, len);
      for (let i = 0; i < len; i++) o[i] = f32ToBf16Bits(vals[i]);
      return outBytes.subarray(0, len * 2);
    }
    case GGMLType.Q8_0: {
      if (len % QK8_0) throw new Error(`${t.name}: chunk of ${len} not a multiple of ${QK8_0}`);
      quantizeQ8_0(vals, 0, len, outBytes, 0);
      return outBytes.subarray(0, (len / QK8_0) * Q8_0_BLOCK_BYTES);
    }
  }
}
