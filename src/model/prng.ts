// Deterministic, fast pseudo-random numbers for weight generation.
//
// - Every tensor gets its own xoshiro128** stream, seeded from (seed, tensor name) through
//   splitmix32, so tensors are independent of each other and of the order they are written in.
// - Normal deviates come from a 65536-entry inverse-CDF table indexed by 16 random bits:
//   one 32-bit draw gives two deviates, and the hot loops are a table lookup per element
//   (the table's 16-bit resolution is irrelevant for random test weights).

/** splitmix32 finalizer step: returns the next state and an output word. */
function splitmix32(state: number): [number, number] {
  state = (state + 0x9e3779b9) | 0;
  let z = state;
  z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
  z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
  z ^= z >>> 16;
  return [state, z >>> 0];
}

/** FNV-1a over the UTF-16 code units of a string (names are ASCII). */
export function hashString(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return h >>> 0;
}

/** xoshiro128** (Blackman & Vigna): 128-bit state, 32-bit outputs. */
export class Xoshiro128 {
  private s0: number;
  private s1: number;
  private s2: number;
  private s3: number;

  /** Seed from a user seed (any non-negative safe integer) and a stream key (e.g. a tensor name). */
  constructor(seed: number, key = '') {
    if (!Number.isSafeInteger(seed) || seed < 0) throw new Error(`seed must be a non-negative safe integer, got ${seed}`);
    const lo = seed >>> 0;
    const hi = Math.floor(seed / 0x100000000) >>> 0;
    let st = (lo ^ Math.imul(hi, 0x27d4eb2f) ^ hashString(key)) | 0;
    let st2 = (hashString(key + '\u0001') ^ hi) | 0;
    const out: number[] = [];
    for (let i = 0; i < 4; i++) {
      let a: number, b: number;
      [st, a] = splitmix32(st);
      [st2, b] = splitmix32(st2);
      out.push((a ^ Math.imul(b, 0x9e3779b1)) >>> 0);
    }
    if ((out[0] | out[1] | out[2] | out[3]) === 0) out[0] = 1; // all-zero state is invalid
    [this.s0, this.s1, this.s2, this.s3] = out;
  }

  /** Next 32-bit unsigned output. */
  nextU32(): number {
    const s0 = this.s0, s1 = this.s1;
    let s2 = this.s2, s3 = this.s3;
    const r = Math.imul(rotl(Math.imul(s1, 5), 7), 9) >>> 0;
    const t = s1 << 9;
    s2 ^= s0;
    s3 ^= s1;
    this.s1 = s1 ^ s2;
    this.s0 = s0 ^ s3;
    this.s2 = s2 ^ t;
    this.s3 = rotl(s3, 11);
    return r;
  }

  /** Uniform in [0, 1). */
  nextFloat(): number {
    return this.nextU32() / 0x100000000;
  }

  /** Fill out[0..n) with 32-bit outputs; the hot loop keeps the state in locals. */
  fillU32(out: Uint32Array, n = out.length): void {
    let s0 = this.s0, s1 = this.s1, s2 = this.s2, s3 = this.s3;
    for (let i = 0; i < n; i++) {
      const x = Math.imul(s1, 5);
      out[i] = Math.imul((x << 7) | (x >>> 25), 9);
      const t = s1 << 9;
      s2 ^= s0;
      s3 ^= s1;
      s1 ^= s2;
      s0 ^= s3;
      s2 ^= t;
      s3 = (s3 << 11) | (s3 >>> 21);
    }
    this.s0 = s0; this.s1 = s1; this.s2 = s2; this.s3 = s3;
  }
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}

/** Inverse of the standard normal CDF (Acklam's rational approximation, |rel err| < 1.2e-9). */
export function normalQuantile(p: number): number {
  const a = [-3.969683028665376e1, 2.209460984245205e2, -2.759285104469687e2, 1.38357751867269e2, -3.066479806614716e1, 2.506628277459239];
  const b = [-5.447609879822406e1, 1.615858368580409e2, -1.556989798598866e2, 6.680131188771972e1, -1.328068155288572e1];
  const c = [-7.784894002430293e-3, -3.223964580411365e-1, -2.400758277161838, -2.549732539343734, 4.374664141464968, 2.938163982698783];
  const d = [7.784695709041462e-3, 3.224671290700398e-1, 2.445134137142996, 3.754408661907416];
  const plow = 0.02425;
  if (p < plow) {
    const q = Math.sqrt(-2 * Math.log(p));
    return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
  }
  if (p > 1 - plow) {
    const q = Math.sqrt(-2 * Math.log(1 - p));
    return -(((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
  }
  const q = p - 0.5;
  const r = q * q;
  return ((((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q) / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1);
}

let normalTable: Float32Array | undefined;

/** 65536 standard-normal quantiles at p = (i + 0.5) / 65536, made antisymmetric (mean exactly 0). */
export function standardNormalTable(): Float32Array {
  if (!normalTable) {
    const t = new Float32Array(65536);
    for (let i = 0; i < 32768; i++) {
      const v = normalQuantile((i + 0.5) / 65536);
      t[i] = v;
      t[65535 - i] = -v;
    }
    normalTable = t;
  }
  return normalTable;
}
