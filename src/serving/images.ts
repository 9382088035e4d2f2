// A request's images: counted against --limit-mm-per-prompt, loaded (data:, http(s), file://)
// and prepared for the engine in parallel; a bad image is a 400 naming its field.
import type { EngineImage } from '../engine/native-types.js';
import { ImageInputError } from '../images/errors.js';
import { loadImageBytes, type ImageSourceOptions } from '../images/image-source.js';
import { prepareImage, type PrepareOptions } from '../images/prepare.js';
import { badRequest } from './errors.js';

/** Checks the image count, then loads (data:, http(s), file://) and prepares every image, in parallel. */
export async function prepareImages(
  images: { url: string; param: string }[],
  opts: { imageOptions: PrepareOptions; imageSource: ImageSourceOptions; limit?: number },
  signal: AbortSignal,
): Promise<EngineImage[]> {
  if (opts.limit !== undefined && images.length > opts.limit) {
    throw badRequest(
      `At most ${opts.limit} image(s) may be provided in one prompt (--limit-mm-per-prompt), got ${images.length}.`,
      images[opts.limit]!.param,
      'too_many_images',
    );
  }
  // The first failure stops the other downloads.
  const ac = new AbortController();
  const both = AbortSignal.any([signal, ac.signal]);
  try {
    return await Promise.all(
      images.map(async ({ url, param }) => {
        try {
          const bytes = await loadImageBytes(url, opts.imageSource, both);
          const p = await prepareImage(bytes, opts.imageOptions);
          return { width: p.width, height: p.height, rgb: p.rgb };
        } catch (err) {
          if (err instanceof ImageInputError) throw badRequest(err.message, param, err.code);
          throw err;
        }
      }),
    );
  } catch (err) {
    ac.abort();
    throw err;
  }
}
