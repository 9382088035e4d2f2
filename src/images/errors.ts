// Why an image in a request could not be used. Every one of these is the client's fault
// (HTTP 400); the handler maps them to OpenAI's invalid_request_error.

export type ImageErrorCode =
  | 'unsupported_url_scheme'
  | 'invalid_data_uri'
  | 'invalid_base64'
  | 'unsupported_image_format'
  | 'image_decode_failed'
  | 'invalid_image_size'
  | 'image_fetch_failed'
  | 'image_fetch_timeout'
  | 'image_too_large'
  | 'local_media_not_allowed'
  | 'local_media_forbidden'
  | 'local_media_not_found';

export class ImageInputError extends Error {
  constructor(readonly code: ImageErrorCode, message: string) {
    super(message);
    this.name = 'ImageInputError';
  }
}
