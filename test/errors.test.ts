// OpenAI error objects and the mapping of Fastify's own errors.
import t from 'tap';
import { ApiError, badRequest, internalError, modelNotFound, toApiError } from '../src/serving/errors.js';

t.test('error objects', async (t) => {
  t.same(badRequest('bad temperature', 'temperature').toJSON(), {
    error: { message: 'bad temperature', type: 'invalid_request_error', param: 'temperature', code: null },
  });
  const nf = modelNotFound('gpt-4');
  t.equal(nf.status, 404);
  t.same(nf.toJSON(), { error: { message: 'The model `gpt-4` does not exist.', type: 'NotFoundError', param: 'model', code: 'model_not_found' } });
  t.equal(internalError('boom').status, 500);
});

t.test('toApiError maps Fastify errors and unknown throws', async (t) => {
  const e = (code: string, statusCode: number, message = 'x') => Object.assign(new Error(message), { code, statusCode });
  t.match(toApiError(e('FST_ERR_CTP_BODY_TOO_LARGE', 413)), { status: 413, type: 'invalid_request_error' });
  t.match(toApiError(e('FST_ERR_CTP_INVALID_JSON_BODY', 400)), { status: 400, code: 'invalid_json' });
  t.match(toApiError(e('FST_ERR_CTP_EMPTY_JSON_BODY', 400)), { status: 400, message: /empty/ });
  t.match(toApiError(e('FST_ERR_CTP_INVALID_MEDIA_TYPE', 415)), { status: 415, message: /application\/json/ });
  t.match(toApiError(new SyntaxError('Unexpected token')), { status: 400, code: 'invalid_json' });
  t.match(toApiError(e('SOMETHING', 429, 'slow down')), { status: 429, message: 'slow down' });
  const internal = toApiError(new Error('kaput'));
  t.equal(internal.status, 500);
  t.match(internal.message, /kaput/);
  t.equal(toApiError('a string').status, 500);
  const same = badRequest('x');
  t.equal(toApiError(same), same, 'ApiErrors pass through');
  t.ok(same instanceof ApiError);
});
