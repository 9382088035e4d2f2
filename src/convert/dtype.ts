// Element conversion from a checkpoint's float dtype (F32, F16, BF16) to a GGUF tensor type
// (F32, F16, BF16, Q8_0), with the results llama.cpp's converter gets: it widens everything to
// f32 and rounds from there (round-to-nearest-even for F16/BF16, ggml's reference Q8_0). The
// 16-bit paths are 65536-entry tables, so bf16 -> f16 costs one lookup per element.

import { GGMLType } from '../model/gguf.js';
import { bf16BitsToF32, f16BitsToF32, f32ToBf16Bits, f32ToF16Bits, quantizeQ8_0, Q8_0_BLOCK_BYTES, QK8_0 } from '../model/encodings.js';
import type { FloatDType } from './safetensors.js';

const SRC_BYTES: Record<FloatDType, number> = { F32: 4, F16: 2, BF16: 2 };

let f16ToF32: Float32Array | undefined;
let bf16ToF16: Uint16Array | undefined;
let f16ToBf16: Uint16Array | undefined;

function table16(from: (b: number) => number, to: (x: number) => number): Uint16Array {
  const t = new Uint16Array(65536);
  for (let i = 0; i < 65536; i++) t[i] = to(from(i));
  return t;
}

/** Source elements widened to f32 into `dst`. */
function toF32(src: Uint8Array, dtype: FloatDType, n: number, dst: Float32Array): void {
  if (dtype === 'F32') {
    dst.set(new Float32Array(src.buffer, src.byteOffset, n));
  } else if (dtype === 'BF16') {
    const s = new Uint16Array(src.buffer, src.byteOffset, n);
    const d = new Uint32Array(dst.buffer, dst.byteOffset, n);
    for (let i = 0; i < n; i++) d[i] = s[i] << 16;
  } else {
    const tbl = (f16ToF32 ??= Float32Array.from({ length: 65536 }, (_, i) => f16BitsToF32(i)));
    const s = new Uint16Array(src.buffer, src.byteOffset, n);
    for (let i = 0; i < n; i++) dst[i] = tbl[s[i]];
  }
}

/** Bytes per source element. */
export function dtypeBytes(dtype: FloatDType): number {
  return SRC_BYTES[dtype];
}

/** Scratch for convertElements; one per conversion run. */
export class ConvertScratch {
  f32: Float32Array;
  out: Uint8Array;
  constructor(readonly maxElems: number) {
    this.f32 = new Float32Array(maxElems);
    this.out = new Uint8Array(maxElems * 4);
  }
}

/**
 * Convert `n` elements (`src`, dtype `from`; src must be 2- or 4-byte aligned as its type needs)
 * to ggml type `to`. Returns the encoded bytes: `src` itself when nothing changes, else a view of
 * `out`. For Q8_0, n must be a multiple of 32 starting on a block boundary.
 */
export function convertElements(src: Uint8Array, from: FloatDType, n: number, to: GGMLType, scratch: ConvertScratch, out: Uint8Array = scratch.out): Uint8Array {
  const same = (from === 'F32' && to === GGMLType.F32) || (from === 'F16' && to === GGMLType.F16) || (from === 'BF16' && to === GGMLType.BF16);
  if (same) return src.subarray(0, n * SRC_BYTES[from]);
  const cross = from === 'BF16' && to === GGMLType.F16 ? (bf16ToF16 ??= table16(bf16BitsToF32, f32ToF16Bits))
    : from === 'F16' && to === GGMLType.BF16 ? (f16ToBf16 ??= table16(f16BitsToF32, f32ToBf16Bits)) : undefined;
  if (cross) {
    const s = new Uint16Array(src.buffer, src.byteOffset, n);
    const d = new Uint16Array(out.buffer, out.byteOffset, n);
    for (let i = 0; i < n; i++) d[i] = cross[s[i]];
    return out.subarray(0, n * 2);
  }
  const f = scratch.f32;
  toF32(src, from, n, f);
  switch (to) {
    case GGMLType.F32:
      new Float32Array(out.buffer, out.byteOffset, n).set(f.subarray(0, n));
      return out.subarray(0, n * 4);
    case GGMLType.F16:
    case GGMLType.BF16: {
      const enc = to === GGMLType.F16 ? f32ToF16Bits : f32ToBf16Bits;
      const d = new Uint16Array(out.buffer, out.byteOffset, n);
      for (let i = 0; i < n; i++) d[i] = enc(f[i]);
      return out.subarray(0, n * 2);
    }
    case GGMLType.Q8_0:
      if (n % QK8_0) throw new Error(`Q8_0 conversion of ${n} elements (not a multiple of ${QK8_0})`);
      quantizeQ8_0(f, 0, n, out, 0);
      return out.subarray(0, (n / QK8_0) * Q8_0_BLOCK_BYTES);
  }
}
