// Image bytes -> the RGB grid the vision encoder takes, the way vLLM's path does it:
//   vLLM: PIL open -> convert("RGB") (RGBA composited onto white) -> HF Qwen2VLImageProcessor
//   (smart_resize, PIL bicubic) -> normalise.
//   here: sharp decode (first frame) -> EXIF orientation applied -> alpha flattened onto white
//   -> sRGB, 3 channels, 8 bits -> Pillow's bicubic resize (the addon's resizeRgb: the
//   resampler llama.cpp's mtmd also uses, bit for bit) to smartResize's size -> raw RGB.
//   llama.cpp normalises; see qwen-resize.ts for why it leaves this size alone.
// Why not sharp's resize: libvips enlarges ~4x slower than this resampler (55 vs 14 ms for
// 1024x1024 -> 1036x1036 on one core, bench/image-prep.ts), and most images are enlarged by a
// few pixels to reach the 28-px grid; and PIL's rounding is what HF's slow processor gives.
import sharp, { type Metadata, type OutputInfo, type Sharp, type SharpOptions } from 'sharp';
import { loadAddon } from '../engine/native.js';
import { DecodeBudget, SHARED_DECODE_BUDGET } from './decode-budget.js';
import { decodeImageDataUri } from './decode-data-uri.js';
import { ImageInputError } from './errors.js';
import { HF_MAX_PIXELS, HF_MIN_PIXELS, ImageSizeError, smartResize, type ResizeLimits } from './qwen-resize.js';

export interface PreparedImage {
  width: number;
  height: number;
  /** width * height * 3 bytes, RGBRGB..., row-major. */
  rgb: Buffer;
  /** Size after EXIF orientation, before resizing. */
  originalWidth: number;
  originalHeight: number;
}

export interface PrepareOptions extends Partial<ResizeLimits> {
  /** Refuse decoding images with more pixels than this (sharp's limitInputPixels). */
  maxInputPixels?: number;
  /** Bounds the decoded pixels held at once across calls (default: the process's shared 1 GiB). */
  decodeBudget?: DecodeBudget;
}

// PIL's decompression-bomb limit (2 * Image.MAX_IMAGE_PIXELS, where it raises rather than warns),
// which vLLM's path inherits: an image is decoded whole before it is resized, 3 bytes a pixel.
const DEFAULT_MAX_INPUT_PIXELS = 2 * 89_478_485;

function decodeFailed(err: unknown, maxInputPixels: number): ImageInputError {
  // libvips messages can span lines; one line reads better in an error object and a log.
  const msg = (err instanceof Error ? err.message : String(err)).trim().replace(/\s*\n\s*/g, '; ');
  if (/exceeds pixel limit/i.test(msg)) {
    const side = Math.floor(Math.sqrt(maxInputPixels));
    return new ImageInputError(
      'invalid_image_size',
      `the image has more than ${maxInputPixels} pixels (about ${side}x${side}), the most this server decodes; send a smaller image`,
    );
  }
  return new ImageInputError('image_decode_failed', `could not decode the image: ${msg}`);
}

const decodeOptions = (maxInputPixels: number): SharpOptions => ({ autoOrient: true, limitInputPixels: maxInputPixels, pages: 1 });

/**
 * The decoding half of the pipeline, as a sharp instance still to be given its output: first
 * frame, EXIF orientation applied, alpha flattened onto white, sRGB (bench/image-prep.ts times it).
 */
export function rgbDecoder(bytes: Buffer, maxInputPixels = DEFAULT_MAX_INPUT_PIXELS): Sharp {
  return sharp(bytes, decodeOptions(maxInputPixels))
    .flatten({ background: { r: 255, g: 255, b: 255 } })
    .toColourspace('srgb');
}

/** Decodes, orients, flattens, converts and resizes image bytes. Throws ImageInputError. */
export async function prepareImage(bytes: Buffer, opts: PrepareOptions = {}): Promise<PreparedImage> {
  const limits: ResizeLimits = {
    minPixels: opts.minPixels ?? HF_MIN_PIXELS,
    maxPixels: opts.maxPixels ?? HF_MAX_PIXELS,
    factor: opts.factor,
  };
  const maxInputPixels = opts.maxInputPixels ?? DEFAULT_MAX_INPUT_PIXELS;
  let meta: Metadata;
  try {
    meta = await sharp(bytes, decodeOptions(maxInputPixels)).metadata();
  } catch (err) {
    throw decodeFailed(err, maxInputPixels);
  }
  const originalWidth = meta.autoOrient?.width ?? meta.width;
  const originalHeight = meta.autoOrient?.height ?? meta.height;
  if (!originalWidth || !originalHeight) {
    throw new ImageInputError('image_decode_failed', 'could not decode the image: unknown dimensions');
  }
  let target: { width: number; height: number };
  try {
    target = smartResize(originalHeight, originalWidth, limits);
  } catch (err) {
    if (err instanceof ImageSizeError) throw new ImageInputError('invalid_image_size', err.message);
    throw err;
  }
  const release = await (opts.decodeBudget ?? SHARED_DECODE_BUDGET).acquire(originalWidth * originalHeight * 3);
  try {
    return await decodeAndResize(bytes, maxInputPixels, originalWidth, originalHeight, target);
  } finally {
    release();
  }
}

async function decodeAndResize(
  bytes: Buffer, maxInputPixels: number, originalWidth: number, originalHeight: number,
  target: { width: number; height: number },
): Promise<PreparedImage> {
  let out: { data: Buffer; info: OutputInfo };
  try {
    out = await rgbDecoder(bytes, maxInputPixels)
      .removeAlpha()
      .raw({ depth: 'uchar' })
      .toBuffer({ resolveWithObject: true });
  } catch (err) {
    throw decodeFailed(err, maxInputPixels);
  }
  const { info } = out;
  if (info.width !== originalWidth || info.height !== originalHeight || info.channels !== 3 ||
      out.data.length !== info.width * info.height * 3) {
    // Not the client's fault: our pipeline produced something unexpected.
    throw new Error(
      `image decoding produced ${info.width}x${info.height}x${info.channels} (${out.data.length} bytes), ` +
      `expected ${originalWidth}x${originalHeight}x3`,
    );
  }
  const data = info.width === target.width && info.height === target.height
    ? out.data
    : await loadAddon().resizeRgb(out.data, info.width, info.height, target.width, target.height);
  return { width: target.width, height: target.height, rgb: data, originalWidth, originalHeight };
}

/** decodeImageDataUri + prepareImage. */
export async function prepareImageFromDataUri(url: string, opts: PrepareOptions = {}): Promise<PreparedImage> {
  const { bytes } = decodeImageDataUri(url);
  return prepareImage(bytes, opts);
}
