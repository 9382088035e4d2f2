// Chat request validation and defaulting (vLLM semantics), field by field.
import t, { type Test } from 'tap';
import { ApiError } from '../src/serving/errors.js';
import { validateChatRequest, type ValidationContext } from '../src/serving/validate.js';

const ctx: ValidationContext = { servedModelNames: ['caprl', 'caprl-alias'], nVocab: 1000 };
const msgs = [{ role: 'user', content: 'hi' }];
const base = { model: 'caprl', messages: msgs };

function v(extra: Record<string, unknown>) {
  return validateChatRequest({ ...base, ...extra }, ctx);
}

/** Asserts a 400 naming `param`. */
function bad(t: Test, extra: Record<string, unknown>, param: string | null, message?: RegExp): void {
  const body = { ...base, ...extra };
  t.throws(() => validateChatRequest(body, ctx), { name: 'ApiError', status: 400, param, type: 'invalid_request_error', message: message ?? /./ },
    `${JSON.stringify(extra).slice(0, 80)} -> 400 (${param})`);
}

t.test('defaults follow vLLM', async (t) => {
  const r = v({});
  t.equal(r.model, 'caprl');
  t.same(r.sampling, {
    temperature: 1, topP: 1, topK: 0, minP: 0, repetitionPenalty: 1, presencePenalty: 0, frequencyPenalty: 0,
    seed: -1, maxTokens: 0, minTokens: 0, ignoreEos: false, stop: [], stopTokenIds: [], logprobs: -1,
  });
  t.equal(r.maxTokens, null, 'max_tokens absent: fill the context later');
  t.equal(r.stream, false);
  t.equal(r.includeUsage, false);
  t.equal(r.logprobs, false);
  t.equal(r.addGenerationPrompt, true);
  t.same(r.messages, [{ role: 'user', parts: [{ type: 'text', text: 'hi' }] }]);
});

t.test('model', async (t) => {
  t.equal(validateChatRequest({ messages: msgs }, ctx).model, 'caprl', 'absent -> first served name');
  t.equal(v({ model: 'caprl-alias' }).model, 'caprl-alias');
  t.throws(() => v({ model: 'gpt-4o' }), { status: 404, type: 'NotFoundError', message: 'The model `gpt-4o` does not exist.', param: 'model' });
  bad(t, { model: 5 }, 'model');
});

t.test('body and messages shape', async (t) => {
  t.throws(() => validateChatRequest([1, 2], ctx), { status: 400, message: /must be a JSON object/ });
  t.throws(() => validateChatRequest(null, ctx), { name: 'ApiError', status: 400 });
  bad(t, { messages: undefined }, 'messages', /required/);
  bad(t, { messages: 'hi' }, 'messages', /must be an array/);
  bad(t, { messages: [] }, 'messages', /at least one/);
  bad(t, { messages: [5] }, 'messages[0]');
  bad(t, { messages: [{ content: 'x' }] }, 'messages[0].role');
  bad(t, { messages: [{ role: 'tool', content: 'x' }] }, 'messages[0].role', /"tool" is not supported/);
  bad(t, { messages: [{ role: 'user' }] }, 'messages[0].content', /required/);
  bad(t, { messages: [{ role: 'user', content: 5 }] }, 'messages[0].content');
  bad(t, { messages: [{ role: 'user', content: [{ type: 'text' }] }] }, 'messages[0].content[0].text');
  bad(t, { messages: [{ role: 'user', content: [{ type: 'image_url', image_url: {} }] }] }, 'messages[0].content[0].image_url.url');
  bad(t, { messages: [{ role: 'user', content: [{ type: 'input_audio', input_audio: {} }] }] }, 'messages[0].content[0].type', /"input_audio" is not supported/);
  bad(t, { messages: [{ role: 'user', content: ['x'] }] }, 'messages[0].content[0]');
});

t.test('messages normalise', async (t) => {
  const r = v({
    messages: [
      { role: 'developer', content: 'be brief' },
      { role: 'user', content: [{ type: 'image_url', image_url: { url: 'data:image/png;base64,AAAA', detail: 'high' } }, { type: 'text', text: 'describe' }] },
      { role: 'assistant', content: null },
      { role: 'user', content: [{ type: 'image_url', image_url: 'data:image/png;base64,BBBB' }] },
    ],
  });
  t.same(r.messages, [
    { role: 'system', parts: [{ type: 'text', text: 'be brief' }] },
    { role: 'user', parts: [{ type: 'image', url: 'data:image/png;base64,AAAA', param: 'messages[1].content[0].image_url.url' }, { type: 'text', text: 'describe' }] },
    { role: 'assistant', parts: [] },
    { role: 'user', parts: [{ type: 'image', url: 'data:image/png;base64,BBBB', param: 'messages[3].content[0].image_url.url' }] },
  ]);
});

t.test('sampling fields in range are passed through', async (t) => {
  const r = v({
    temperature: 0.7, top_p: 0.9, top_k: 40, min_p: 0.05, repetition_penalty: 1.1, presence_penalty: -0.5,
    frequency_penalty: 2, seed: 1234, max_tokens: 64, min_tokens: 8, ignore_eos: true, stop: ['\n\n', 'END'],
    stop_token_ids: [0, 999], logprobs: true, top_logprobs: 5, stream: true, stream_options: { include_usage: true },
    user: 'someone', add_generation_prompt: false, n: 1,
  });
  t.same(r.sampling, {
    temperature: 0.7, topP: 0.9, topK: 40, minP: 0.05, repetitionPenalty: 1.1, presencePenalty: -0.5, frequencyPenalty: 2,
    seed: 1234, maxTokens: 0, minTokens: 8, ignoreEos: true, stop: ['\n\n', 'END'], stopTokenIds: [0, 999], logprobs: 5,
  });
  t.equal(r.maxTokens, 64);
  t.equal(r.stream, true);
  t.equal(r.includeUsage, true);
  t.equal(r.logprobs, true);
  t.equal(r.topLogprobs, 5);
  t.equal(r.addGenerationPrompt, false);
});

t.test('small details', async (t) => {
  t.equal(v({ max_completion_tokens: 10, max_tokens: 99 }).maxTokens, 10, 'max_completion_tokens wins');
  t.equal(v({ max_tokens: 99 }).maxTokens, 99);
  t.same(v({ stop: 'x' }).sampling.stop, ['x'], 'a single stop string');
  t.same(v({ stop: null, stop_token_ids: null, temperature: null }).sampling.stop, [], 'nulls are absent');
  t.equal(v({ top_k: -1 }).sampling.topK, 0, 'top_k -1 disables');
  t.equal(v({ logprobs: true }).sampling.logprobs, 0, 'logprobs without top_logprobs: chosen token only');
  t.equal(v({ logprobs: false }).sampling.logprobs, -1);
  const greedy = v({ temperature: 0, top_p: 0.5, top_k: 5, min_p: 0.2 }).sampling;
  t.same([greedy.temperature, greedy.topP, greedy.topK, greedy.minP], [0, 1, 0, 0], 'temperature 0: greedy, truncation off (vLLM)');
  t.equal(v({ temperature: 3.5 }).sampling.temperature, 3.5, 'vLLM does not cap temperature at 2');
  t.equal(v({ seed: -1 }).sampling.seed, 2147483647, 'negative seeds fold into [0, 2^31)');
  t.equal(v({ seed: 2 ** 40 + 7 }).sampling.seed, 7);
  t.equal(v({ seed: 0 }).sampling.seed, 0);
  t.equal(v({ stream: true, stream_options: {} }).includeUsage, false);
  t.equal(v({ tools: [], logit_bias: {}, response_format: { type: 'text' }, best_of: 1 }).model, 'caprl', 'empty/neutral unsupported fields are fine');
  t.equal(v({ some_future_field: 1 }).model, 'caprl', 'unknown fields are ignored (vLLM)');
  t.equal(v({}).n, 1, 'n defaults to 1');
  t.equal(v({ n: 4 }).n, 4, 'n > 1 is served (one shared prefill)');
  t.equal(v({ user: 'u-1', skip_special_tokens: true }).model, 'caprl', 'user and skip_special_tokens are accepted');
  t.throws(() => validateChatRequest({ messages: [{ role: 'user', content: 'x' }], n: 5 }, { servedModelNames: ['caprl'], maxN: 4 }),
    { status: 400, param: 'n', message: /\[1, 4\]/ }, 'n above --max-num-seqs');
});

t.test('out-of-range and wrongly typed values name their field', async (t) => {
  bad(t, { temperature: -0.1 }, 'temperature', /non-negative/);
  bad(t, { temperature: '0.5' }, 'temperature', /must be a number/);
  bad(t, { top_p: 0 }, 'top_p', /\(0, 1\]/);
  bad(t, { top_p: 1.01 }, 'top_p');
  bad(t, { top_k: -2 }, 'top_k');
  bad(t, { top_k: 2.5 }, 'top_k', /integer/);
  bad(t, { min_p: 1.5 }, 'min_p');
  bad(t, { min_p: -0.1 }, 'min_p');
  bad(t, { repetition_penalty: 0 }, 'repetition_penalty', /greater than zero/);
  bad(t, { presence_penalty: 2.5 }, 'presence_penalty', /\[-2, 2\]/);
  bad(t, { frequency_penalty: -3 }, 'frequency_penalty');
  bad(t, { seed: 1.5 }, 'seed');
  bad(t, { seed: 'abc' }, 'seed');
  bad(t, { max_tokens: 0 }, 'max_tokens', /at least 1/);
  bad(t, { max_tokens: 3.5 }, 'max_tokens');
  bad(t, { max_completion_tokens: -5 }, 'max_completion_tokens');
  bad(t, { min_tokens: -1 }, 'min_tokens');
  bad(t, { min_tokens: 20, max_tokens: 10 }, 'min_tokens', /less than or equal to max_tokens/);
  bad(t, { stop: 5 }, 'stop');
  bad(t, { stop: ['a', 5] }, 'stop');
  bad(t, { stop: [''] }, 'stop', /empty string/);
  bad(t, { stop_token_ids: [1000] }, 'stop_token_ids', /\[0, 999\]/);
  bad(t, { stop_token_ids: [-1] }, 'stop_token_ids');
  bad(t, { stop_token_ids: 'x' }, 'stop_token_ids');
  bad(t, { ignore_eos: 'yes' }, 'ignore_eos', /boolean/);
  bad(t, { n: 0 }, 'n');
  bad(t, { n: 1.5 }, 'n', /integer/);
  bad(t, { user: 5 }, 'user', /string/);
  bad(t, { skip_special_tokens: 'no' }, 'skip_special_tokens', /boolean/);
  bad(t, { logprobs: 1 }, 'logprobs', /boolean/);
  bad(t, { top_logprobs: 3 }, 'top_logprobs', /logprobs` must be set to true/);
  bad(t, { logprobs: true, top_logprobs: 21 }, 'top_logprobs', /\[0, 20\]/);
  bad(t, { logprobs: true, top_logprobs: -1 }, 'top_logprobs');
  bad(t, { stream: 'true' }, 'stream');
  bad(t, { stream_options: { include_usage: true } }, 'stream_options', /only be set when `stream` is true/);
  bad(t, { stream: true, stream_options: 'yes' }, 'stream_options');
  bad(t, { stream: true, stream_options: { include_usage: 1 } }, 'stream_options.include_usage');
  bad(t, { temperature: Infinity }, 'temperature');
});

t.test('unsupported features are refused, not ignored', async (t) => {
  bad(t, { tools: [{ type: 'function', function: { name: 'f' } }] }, 'tools', /tool calling/);
  bad(t, { response_format: { type: 'json_object' } }, 'response_format');
  bad(t, { logit_bias: { 5: 100 } }, 'logit_bias');
  bad(t, { best_of: 3 }, 'best_of');
  bad(t, { echo: true }, 'echo');
  bad(t, { guided_json: {} }, 'guided_json');
});
