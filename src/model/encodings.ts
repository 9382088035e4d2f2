// Scalar and block encodings of the GGML tensor types the generator writes:
// F32, F16, BF16 and Q8_0. Encoders follow ggml's reference code bit for bit
// (round-to-nearest-even for F16/BF16; ggml's quantize_row_q8_0_ref for Q8_0),
// decoders exist for tests and for the GGUF reader.

const f32buf = new Float32Array(1);
const u32buf = new Uint32Array(f32buf.buffer);

/** Float32 → IEEE half bits, round to nearest even (as ggml's GGML_FP32_TO_FP16 / F16C). */
export function f32ToF16Bits(value: number): number {
  f32buf[0] = value;
  const x = u32buf[0];
  const sign = (x >>> 16) & 0x8000;
  const absx = x & 0x7fffffff;
  if (absx >= 0x7f800000) {
    // Inf or NaN (keep NaN quiet and non-zero).
    return sign | 0x7c00 | (absx > 0x7f800000 ? 0x200 | ((absx >>> 13) & 0x3ff) : 0);
  }
  if (absx >= 0x477ff000) {
    // Rounds to >= 65520: overflow to Inf.
    return sign | 0x7c00;
  }
  if (absx < 0x38800000) {
    // Result is subnormal (or zero) in half precision.
    if (absx < 0x33000000) return sign; // < 2^-25 rounds to 0
    const e = absx >>> 23;
    const m = (absx & 0x7fffff) | 0x800000;
    // value = m * 2^(e-150); the half subnormal unit is 2^-24, so q = m * 2^(e-126):
    // drop the low (126 - e) bits of m (14..24 of them here), rounding to nearest even.
    const drop = 126 - e;
    const q = m >>> drop;
    const rem = m & ((1 << drop) - 1);
    const half = 1 << (drop - 1);
    let r = q;
    if (rem > half || (rem === half && (q & 1) === 1)) r += 1;
    return sign | r;
  }
  // Normal: rebias exponent 127 → 15, round mantissa 23 → 10 bits.
  let h = ((absx - 0x38000000) >>> 13) & 0xffff;
  const rem = absx & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && (h & 1) === 1)) h += 1; // carry may bump exponent: still correct
  return sign | h;
}

/** IEEE half bits → number. */
export function f16BitsToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const e = (h >>> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return sign * m * 2 ** -24;
  if (e === 31) return m ? NaN : sign * Infinity;
  return sign * (1 + m / 1024) * 2 ** (e - 15);
}

/** Float32 → bfloat16 bits, exactly as ggml_compute_fp32_to_bf16 (RNE, NaN kept quiet). */
export function f32ToBf16Bits(value: number): number {
  f32buf[0] = value;
  const u = u32buf[0];
  if ((u & 0x7fffffff) > 0x7f800000) return ((u >>> 16) | 64) & 0xffff;
  return ((u + (0x7fff + ((u >>> 16) & 1))) >>> 16) & 0xffff;
}

/** bfloat16 bits → number. */
export function bf16BitsToF32(b: number): number {
  u32buf[0] = (b & 0xffff) << 16;
  return f32buf[0];
}

export const QK8_0 = 32;
/** Bytes of one Q8_0 block: f16 scale + 32 int8. */
export const Q8_0_BLOCK_BYTES = 34;

/**
 * Quantize `n` floats (n a multiple of 32) from `src[srcOff..]` into Q8_0 blocks at
 * `dst[dstOff..]`. Per block: d = amax/127 stored as f16, q = roundf(x / d) as int8
 * (ggml's quantize_row_q8_0_ref: it divides by the f32 d, not the rounded f16 one).
 */
export function quantizeQ8_0(src: Float32Array, srcOff: number, n: number, dst: Uint8Array, dstOff: number): void {
  if (n % QK8_0 !== 0) throw new Error(`Q8_0 needs a multiple of ${QK8_0} values, got ${n}`);
  const nb = n / QK8_0;
  const q8 = new Int8Array(dst.buffer, dst.byteOffset, dst.length);
  let o = dstOff;
  let s = srcOff;
  for (let b = 0; b < nb; b++) {
    let amax = 0;
    for (let j = 0; j < QK8_0; j++) amax = Math.max(amax, Math.abs(src[s + j]));
    const d = Math.fround(amax / 127);
    const id = d !== 0 ? Math.fround(1 / d) : 0;
    const hb = f32ToF16Bits(d);
    dst[o] = hb & 0xff;
    dst[o + 1] = hb >>> 8;
    for (let j = 0; j < QK8_0; j++) {
      const x = Math.fround(src[s + j] * id); // |x| <= 127
      // roundf (half away from zero) without a data-dependent branch in the common case:
      // floor(x + 0.5) via an integer truncation of a positive number, then fix negative ties.
      let r = ((x + 128.5) | 0) - 128;
      if (r - x === 0.5 && x < 0) r -= 1;
      q8[o + 2 + j] = r;
    }
    o += Q8_0_BLOCK_BYTES;
    s += QK8_0;
  }
}

/** Dequantize Q8_0 blocks back to floats (tests, reader). */
export function dequantizeQ8_0(src: Uint8Array, srcOff: number, n: number, dst: Float32Array, dstOff = 0): void {
  if (n % QK8_0 !== 0) throw new Error(`Q8_0 needs a multiple of ${QK8_0} values, got ${n}`);
  const nb = n / QK8_0;
  let o = srcOff;
  let t = dstOff;
  for (let b = 0; b < nb; b++) {
    const d = f16BitsToF32(src[o] | (src[o + 1] << 8));
    for (let j = 0; j < QK8_0; j++) {
      const q = (src[o + 2 + j] << 24) >> 24;
      dst[t + j] = q * d;
    }
    o += Q8_0_BLOCK_BYTES;
    t += QK8_0;
  }
}
