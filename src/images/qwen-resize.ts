// Qwen2.5-VL's `smart_resize` (transformers, image_processing_qwen2_vl.py), the rule vLLM
// applies through the HF processor: both sides become multiples of 28 (patch 14 x merge 2),
// the area lands in [minPixels, maxPixels], the aspect ratio is kept as well as it can be.
//
// What llama.cpp does with what we hand it (tools/mtmd, read at the vendored commit):
//   mtmd uses mtmd_image_preprocessor_dyn_size for PROJECTOR_TYPE_QWEN25VL, which runs
//   img_tool::calc_size_preserved_ratio with align 28 and the limits from
//   clip.cpp `set_limit_image_tokens(8, 4096)`: min 8*784 = 6272 px, max 4096*784 = 3211264 px
//   (unless mtmd_context_params.image_min_tokens / image_max_tokens override them). Its rule is
//   the same smart_resize (round to 28, then floor-scale above max / ceil-scale below min), and
//   img_tool::resize copies the buffer untouched when the target size equals the input size.
//   So an image whose sides are multiples of 28 and whose area is within [6272, 3211264]
//   passes through llama.cpp unchanged. HF's defaults are wider (3136 .. 12845056), so with
//   the HF defaults an image above 3211264 px (or below 6272 px) would be resized a second
//   time by llama.cpp unless the engine raises its token limits to 4 .. 16384.
//   LLAMA_CPP_QWEN25VL_LIMITS below holds llama.cpp's numbers; the server resizes with them by
//   default (src/entrypoints/openai/server.ts) so the engine never resizes a second time.

export const QWEN_FACTOR = 28;
/** transformers Qwen2VLImageProcessor defaults (CapRL-3B's preprocessor_config.json: the same). */
export const HF_MIN_PIXELS = 56 * 56; // 3136
export const HF_MAX_PIXELS = 14 * 14 * 4 * 16384; // 12845056
export const MAX_ASPECT_RATIO = 200;
/** llama.cpp mtmd's built-in limits for Qwen2/2.5-VL (8 .. 4096 merged tokens of 28x28). */
export const LLAMA_CPP_QWEN25VL_LIMITS = { minPixels: 8 * 784, maxPixels: 4096 * 784 } as const;

export interface ResizeLimits {
  minPixels: number;
  maxPixels: number;
  factor?: number;
}

export class ImageSizeError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ImageSizeError';
  }
}

/** Python 3's round(): round half to even. */
export function pyRound(x: number): number {
  const r = Math.round(x);
  // Math.round rounds .5 up; Python rounds .5 to the even neighbour.
  if (Math.abs(x % 1) === 0.5 && r % 2 !== 0) return r - 1;
  return r;
}

/**
 * HF `smart_resize(height, width, factor=28, min_pixels, max_pixels)`; returns the target size.
 * Throws ImageSizeError for an aspect ratio above 200 (HF raises ValueError) or empty sides.
 */
export function smartResize(
  height: number,
  width: number,
  limits: ResizeLimits = { minPixels: HF_MIN_PIXELS, maxPixels: HF_MAX_PIXELS },
): { height: number; width: number } {
  const factor = limits.factor ?? QWEN_FACTOR;
  const { minPixels, maxPixels } = limits;
  if (!(height >= 1 && width >= 1) || !Number.isInteger(height) || !Number.isInteger(width)) {
    throw new ImageSizeError(`image has invalid size ${width}x${height}`);
  }
  const ratio = Math.max(height, width) / Math.min(height, width);
  if (ratio > MAX_ASPECT_RATIO) {
    throw new ImageSizeError(
      `absolute aspect ratio must be smaller than ${MAX_ASPECT_RATIO}, got ${ratio} (image is ${width}x${height})`,
    );
  }
  let hBar = pyRound(height / factor) * factor;
  let wBar = pyRound(width / factor) * factor;
  if (hBar * wBar > maxPixels) {
    const beta = Math.sqrt((height * width) / maxPixels);
    hBar = Math.max(factor, Math.floor(height / beta / factor) * factor);
    wBar = Math.max(factor, Math.floor(width / beta / factor) * factor);
  } else if (hBar * wBar < minPixels) {
    const beta = Math.sqrt(minPixels / (height * width));
    hBar = Math.ceil((height * beta) / factor) * factor;
    wBar = Math.ceil((width * beta) / factor) * factor;
  }
  return { height: hBar, width: wBar };
}

/** Merged vision tokens Qwen2.5-VL spends on an image of this (already resized) size. */
export function qwenImageTokens(width: number, height: number, factor = QWEN_FACTOR): number {
  return (width / factor) * (height / factor);
}
