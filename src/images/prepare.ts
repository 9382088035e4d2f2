// Image bytes -> the RGB grid the vision encoder takes, the way vLLM's path does it:
//   vLLM: PIL open -> convert("RGB") (RGBA composited onto white) -> HF Qwen2VLImageProcessor
//   (smart_resize, bicubic) -> normalise.
//   here: sharp decode (first frame) -> EXIF orientation applied -> alpha flattened onto white
//   -> sRGB, 3 channels, 8 bits -> resize (Catmull-Rom cubic = PIL's bicubic, no shrink-on-load
//   shortcut) to smartResize's size -> raw RGB. llama.cpp normalises; see qwen-resize.ts for why
//   it leaves this size alone.
import sharp, { type Metadata, type OutputInfo, type SharpOptions } from 'sharp';
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
}

const DEFAULT_MAX_INPUT_PIXELS = 0x3fff * 0x3fff; // sharp's own default, ~268 Mpx

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

/** Decodes, orients, flattens, converts and resizes image bytes. Throws ImageInputError. */
export async function prepareImage(bytes: Buffer, opts: PrepareOptions = {}): Promise<PreparedImage> {
  const limits: ResizeLimits = {
    minPixels: opts.minPixels ?? HF_MIN_PIXELS,
    maxPixels: opts.maxPixels ?? HF_MAX_PIXELS,
    factor: opts.factor,
  };
  const maxInputPixels = opts.maxInputPixels ?? DEFAULT_MAX_INPUT_PIXELS;
  const sharpOpts: SharpOptions = {
    autoOrient: true,
    limitInputPixels: maxInputPixels,
    pages: 1,
  };
  let meta: Metadata;
  try {
    meta = await sharp(bytes, sharpOpts).metadata();
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
  let out: { data: Buffer; info: OutputInfo };
  try {
    out = await sharp(bytes, sharpOpts)
      .flatten({ background: { r: 255, g: 255, b: 255 } })
      .toColourspace('srgb')
      .resize(target.width, target.height, { fit: 'fill', kernel: 'cubic', fastShrinkOnLoad: false })
      .removeAlpha()
      .raw({ depth: 'uchar' })
      .toBuffer({ resolveWithObject: true });
  } catch (err) {
    throw decodeFailed(err, maxInputPixels);
  }
  const { info, data } = out;
  if (info.width !== target.width || info.height !== target.height || info.channels !== 3 ||
      data.length !== target.width * target.height * 3) {
    // Not the client's fault: our pipeline produced something unexpected.
    throw new Error(
      `image preparation produced ${info.width}x${info.height}x${info.channels} (${data.length} bytes), ` +
      `expected ${target.width}x${target.height}x3`,
    );
  }
  return { width: target.width, height: target.height, rgb: data, originalWidth, originalHeight };
}

/** decodeImageDataUri + prepareImage. */
export async function prepareImageFromDataUri(url: string, opts: PrepareOptions = {}): Promise<PreparedImage> {
  const { bytes } = decodeImageDataUri(url);
  return prepareImage(bytes, opts);
}
