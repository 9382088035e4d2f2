// Pillow's BICUBIC resize on known images: the ground truth for our resampler
// (kernels/image-prep-ref.cpp, used by the CUDA kernel's check and by prepareImage).

/** Deterministic test image: 32-bit LCG, top byte per sample (same generator as the Pillow fixtures). */
export function lcgImage(w: number, h: number): Buffer {
  let s = (w * 1000 + h) >>> 0;
  const out = Buffer.alloc(w * h * 3);
  for (let i = 0; i < out.length; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = s >>> 24;
  }
  return out;
}

// [w, h, out_w, out_h, sha256 of the resized RGB bytes], generated once with Pillow 12.3:
//   Image.frombytes('RGB', (w, h), lcg_image(w, h)).resize((ow, oh), Image.BICUBIC).tobytes()
// lcg_image: s = w*1000 + h; per byte s = (s*1664525 + 1013904223) mod 2^32, byte = s >> 24.
export const PILLOW_CASES: [number, number, number, number, string][] = [
  [37, 23, 56, 28, '248c1585acd8820914cbd91a8124e10b035e1842e3839ecaed92dca734345618'],
  [100, 80, 56, 84, '34d637476246068cf4d17f610f669c0a7bc92283a4c5f14c72d02026ceaeba48'],
  [333, 517, 336, 504, '520975bf12101071c49210bf4970007df0f1fe216837df535fe5d2f400e49926'],
  [640, 480, 224, 168, '0e17ff5c6789ba0e99348ff126f374b7283d359692a49c1e3d94d30434e8b6b8'],
  [50, 50, 50, 28, '9bef414d201a3d8de0c7659af614a18671459b077c73b9dcfac8913732da07f9'],
  [29, 31, 84, 31, 'cf4493a86c577e6bfd7bc47580f8a87b9202eb259c4d107e316858533335ca7a'],
  [1000, 700, 1008, 700, 'a9bac485446a2a13b5407ef487465eecf7f24eac4b86a3f76851e70c3774e7a1'],
  [7, 5, 1, 1, '952f8009d19fb5bd5e918327f9840003078b0619930944514d018946cb7fb1a3'],
  [1, 1, 28, 56, '419bc88dacf76c1eb5d0fbbbac540bb3f41269eec35e630b296dcfc212c4f306'],
  [300, 200, 299, 201, 'a600fff24f6feb3ce659bfc0941cb7afdc4af40d5e38c7fde7e2a075e3fbf082'],
];
