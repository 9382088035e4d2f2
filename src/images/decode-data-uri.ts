// data: URIs carrying a base64 image, as OpenAI clients send them:
//   data:image/png;base64,iVBORw0KGgo...
// As in vLLM, only base64 data URIs are accepted and the declared media type is not trusted:
// the bytes are sniffed, and must be PNG, JPEG, WebP or GIF.
import { ImageInputError } from './errors.js';

export type ImageFormat = 'png' | 'jpeg' | 'webp' | 'gif';

export interface DecodedImageBytes {
  /** Media type the URI declared (may be empty or wrong; informational). */
  declaredType: string;
  format: ImageFormat;
  bytes: Buffer;
}

const BASE64_RE = /^[A-Za-z0-9+/]*={0,2}$/;
const WHITESPACE_RE = /[\t\n\f\r ]+/g;
const HAS_WHITESPACE_RE = /[\t\n\f\r ]/;

/** Which image format these bytes are, from their magic numbers; null when none we take. */
export function sniffImageFormat(b: Buffer): ImageFormat | null {
  if (b.length >= 8 && b.readUInt32BE(0) === 0x89504e47 && b.readUInt32BE(4) === 0x0d0a1a0a) return 'png';
  if (b.length >= 3 && b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff) return 'jpeg';
  if (b.length >= 12 && b.toString('latin1', 0, 4) === 'RIFF' && b.toString('latin1', 8, 12) === 'WEBP') return 'webp';
  if (b.length >= 6 && (b.toString('latin1', 0, 6) === 'GIF87a' || b.toString('latin1', 0, 6) === 'GIF89a')) return 'gif';
  return null;
}

/** Short, safe rendering of the start of a URL for error messages. */
function preview(url: string): string {
  const s = url.slice(0, 40).replace(/[^\x20-\x7e]/g, '?');
  return url.length > 40 ? `${s}...` : s;
}

/** Decodes a data: URI to image bytes; throws ImageInputError with a clear message otherwise. */
export function decodeImageDataUri(url: string): DecodedImageBytes {
  if (typeof url !== 'string' || url.length === 0) {
    throw new ImageInputError('invalid_data_uri', 'image_url.url must be a non-empty string');
  }
  const scheme = /^([a-zA-Z][a-zA-Z0-9+.-]*):/.exec(url)?.[1]?.toLowerCase();
  if (scheme !== 'data') {
    if (scheme === 'http' || scheme === 'https' || scheme === 'file') {
      throw new ImageInputError(
        'unsupported_url_scheme',
        `image URLs with the ${scheme}: scheme are not supported; send the image inline as a base64 data URI (data:image/png;base64,...)`,
      );
    }
    throw new ImageInputError(
      'unsupported_url_scheme',
      `image_url.url must be a base64 data URI (data:image/png;base64,...), got "${preview(url)}"`,
    );
  }
  const comma = url.indexOf(',');
  if (comma < 0) {
    throw new ImageInputError('invalid_data_uri', `malformed data URI "${preview(url)}": no "," before the data`);
  }
  const header = url.slice(5, comma); // after "data:"
  const params = header.split(';').map((p) => p.trim());
  const declaredType = (params[0] ?? '').toLowerCase();
  if (!params.slice(1).some((p) => p.toLowerCase() === 'base64')) {
    throw new ImageInputError('invalid_data_uri', 'only base64 data URIs are supported (data:<type>;base64,<data>)');
  }
  // "data:image;base64,..." (no subtype) is what Qwen2.5-VL's and CapRL's own examples send.
  if (declaredType !== '' && declaredType !== 'image' && !declaredType.startsWith('image/')) {
    throw new ImageInputError('invalid_data_uri', `data URI media type must be an image/* type, got "${declaredType}"`);
  }
  let data = url.slice(comma + 1);
  if (HAS_WHITESPACE_RE.test(data)) data = data.replace(WHITESPACE_RE, '');
  if (data.length === 0) {
    throw new ImageInputError('invalid_base64', 'the data URI carries no data');
  }
  if (!BASE64_RE.test(data) || data.length % 4 === 1 || (data.endsWith('=') && data.length % 4 !== 0)) {
    throw new ImageInputError('invalid_base64', 'the data URI payload is not valid base64');
  }
  const bytes = Buffer.from(data, 'base64');
  const format = sniffImageFormat(bytes);
  if (!format) {
    throw new ImageInputError(
      'unsupported_image_format',
      'the data URI does not hold a PNG, JPEG, WebP or GIF image (unrecognised file signature)',
    );
  }
  return { declaredType, format, bytes };
}
