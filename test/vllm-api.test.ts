// The vllm serve surface through the official `openai` client (and raw HTTP where the client
// hides the wire): n choices, logprobs, /v1/completions, /tokenize + /detokenize, /ping,
// /version, --api-key, remote image URLs from a loopback server, file:// images, several
// images per prompt, multi-turn conversations.
import t from 'tap';
import { mkdirSync, mkdtempSync, realpathSync, symlinkSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import OpenAI from 'openai';
import { startImageServer, type ImageServer } from './helpers/image-server.js';
import { apiError, pngDataUri, startTestServer, type TestServer } from './helpers/server.js';

type Body = Record<string, unknown>;
const chat = (s: TestServer, body: Body) => s.client.chat.completions.create(body as unknown as OpenAI.ChatCompletionCreateParamsNonStreaming);
const post = (url: string, body: unknown, headers: Record<string, string> = {}) =>
  fetch(url, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: JSON.stringify(body) });

function imageMessage(url: string, text = 'Describe the image.') {
  return [{ role: 'user', content: [{ type: 'image_url', image_url: { url } }, { type: 'text', text }] }];
}

const pngBytes = (uri: string) => Buffer.from(uri.slice(uri.indexOf(',') + 1), 'base64');

t.test('vllm serve parity on the tiny model', async (t) => {
  const media = realpathSync(mkdtempSync(path.join(os.tmpdir(), 'caprl-media-')));
  const allowed = path.join(media, 'allowed');
  mkdirSync(allowed);
  const image = await pngDataUri(224, 224);
  writeFileSync(path.join(allowed, 'a.png'), pngBytes(image));
  writeFileSync(path.join(media, 'outside.png'), pngBytes(image));
  symlinkSync(path.join(media, 'outside.png'), path.join(allowed, 'escape.png'));

  const s = await startTestServer({
    engine: { maxModelLen: 1024 },
    server: {
      limitImagesPerPrompt: 3,
      // The image server is on loopback: allowed explicitly (url-guard.ts refuses it by default).
      imageSource: { fetchTimeoutMs: 800, maxBytes: 256 * 1024, maxRedirects: 3, allowedLocalMediaPath: allowed, allowPrivateImageUrls: true },
    },
  });
  t.teardown(() => s.close());
  const srv: ImageServer = await startImageServer(pngBytes(image));
  t.teardown(() => srv.close());

  const text = [{ role: 'user', content: 'Tell me a story.' }];

  t.test('n > 1: choices with indices, distinct samples, usage = prompt once + every completion', async (t) => {
    const one = await chat(s, { model: 'caprl', messages: text, max_tokens: 10, ignore_eos: true, temperature: 0 });
    const r = await chat(s, { model: 'caprl', messages: text, n: 3, max_tokens: 10, ignore_eos: true, temperature: 1.0, seed: 11 });
    t.equal(r.choices.length, 3);
    t.same(r.choices.map((c) => c.index), [0, 1, 2]);
    t.ok(r.choices.every((c) => c.finish_reason === 'length' && c.message.role === 'assistant'));
    t.equal(r.usage!.prompt_tokens, one.usage!.prompt_tokens, 'the prompt counts once');
    t.equal(r.usage!.completion_tokens, 30, 'every choice counts');
    t.equal(r.usage!.total_tokens, r.usage!.prompt_tokens + 30);
    t.ok(new Set(r.choices.map((c) => c.message.content)).size >= 2, 'temperature 1: the choices differ');
    const again = await chat(s, { model: 'caprl', messages: text, n: 3, max_tokens: 10, ignore_eos: true, temperature: 1.0, seed: 11 });
    t.same(again.choices.map((c) => c.message.content), r.choices.map((c) => c.message.content), 'same seed, same choices');
    const greedy = await chat(s, { model: 'caprl', messages: text, n: 2, max_tokens: 10, ignore_eos: true, temperature: 0 });
    t.equal(greedy.choices[0]!.message.content, one.choices[0]!.message.content);
    t.equal(greedy.choices[1]!.message.content, one.choices[0]!.message.content, 'greedy: every choice is the greedy text');
  });

  t.test('n > 1 streamed: a role chunk per choice first, chunks carry their index, one finish each, usage', async (t) => {
    const params = { model: 'caprl', messages: imageMessage(image), n: 2, max_tokens: 8, ignore_eos: true, temperature: 1.0, seed: 5 };
    const whole = await chat(s, params);
    const stream = await s.client.chat.completions.create({ ...(params as unknown as OpenAI.ChatCompletionCreateParamsStreaming), stream: true, stream_options: { include_usage: true } });
    const chunks: OpenAI.ChatCompletionChunk[] = [];
    for await (const ch of stream) chunks.push(ch);
    t.same(chunks.slice(0, 2).map((c) => [c.choices[0]!.index, c.choices[0]!.delta.role]), [[0, 'assistant'], [1, 'assistant']]);
    for (const i of [0, 1]) {
      const mine = chunks.filter((c) => c.choices[0]?.index === i);
      t.equal(mine.map((c) => c.choices[0]!.delta.content ?? '').join(''), whole.choices[i]!.message.content, `choice ${i}: same text`);
      t.equal(mine.filter((c) => c.choices[0]!.finish_reason).length, 1, `choice ${i}: one finish`);
      t.equal(mine.find((c) => c.choices[0]!.finish_reason)!.choices[0]!.finish_reason, 'length');
    }
    t.ok(chunks.every((c) => c.choices.length <= 1), 'one choice per chunk');
    const last = chunks[chunks.length - 1]!;
    t.same(last.choices, []);
    t.same(last.usage, whole.usage);
  });

  t.test('logprobs per choice', async (t) => {
    const r = await s.client.chat.completions.create({ model: 'caprl', messages: text as OpenAI.ChatCompletionMessageParam[], n: 2, max_tokens: 4, logprobs: true, top_logprobs: 2, temperature: 1.0, seed: 3 });
    for (const c of r.choices) {
      const content = c.logprobs!.content!;
      t.equal(content.map((e) => e.token).join(''), c.message.content);
      t.ok(content.every((e) => e.top_logprobs.length === 2 && e.logprob <= 0));
    }
  });

  t.test("Qwen's data:image;base64 form, several images, multi-turn, and the image limit", async (t) => {
    const qwenStyle = image.replace('data:image/png;base64,', 'data:image;base64,');
    const a = await chat(s, { model: 'caprl', messages: [{ role: 'system', content: 'You are a helpful assistant.' }, ...imageMessage(qwenStyle)], max_tokens: 2 });
    const b = await chat(s, { model: 'caprl', messages: [{ role: 'system', content: 'You are a helpful assistant.' }, ...imageMessage(image)], max_tokens: 2 });
    t.equal(a.usage!.prompt_tokens, b.usage!.prompt_tokens);
    const three = await chat(s, {
      model: 'caprl', max_tokens: 2,
      messages: [{ role: 'user', content: [0, 1, 2].map(() => ({ type: 'image_url', image_url: { url: image } })).concat([{ type: 'text', text: 'Compare.' }] as never[]) }],
    });
    t.ok(three.usage!.prompt_tokens > 3 * 64, 'three images counted');
    const multi = await chat(s, {
      model: 'caprl', max_tokens: 2,
      messages: [
        ...imageMessage(image, 'What is this?'),
        { role: 'assistant', content: 'A gradient.' },
        { role: 'user', content: [{ type: 'text', text: 'And this one?' }, { type: 'image_url', image_url: { url: image } }] },
      ],
    });
    t.ok(multi.usage!.prompt_tokens > 2 * 64, 'multi-turn with an image in two turns');
    const e = await apiError(chat(s, {
      model: 'caprl', messages: [{ role: 'user', content: [0, 1, 2, 3].map(() => ({ type: 'image_url', image_url: { url: image } })) }],
    }));
    t.equal(e.status, 400);
    t.match(e.message, /At most 3 image\(s\) may be provided in one prompt/);
    t.equal(e.param, 'messages[0].content[3].image_url.url');
  });

  t.test('remote image URLs: fetched, redirects followed, too large / too slow / missing refused', async (t) => {
    const local = await chat(s, { model: 'caprl', messages: imageMessage(image), max_tokens: 1 });
    const remote = await chat(s, { model: 'caprl', messages: imageMessage(`${srv.url}/img.png`), max_tokens: 1 });
    t.equal(remote.usage!.prompt_tokens, local.usage!.prompt_tokens, 'same image, same prompt');
    const redirected = await chat(s, { model: 'caprl', messages: imageMessage(`${srv.url}/redirect/2`), max_tokens: 1 });
    t.equal(redirected.usage!.prompt_tokens, local.usage!.prompt_tokens, 'after 2 redirects');
    const cases: [string, RegExp, string][] = [
      ['/redirect/5', /more than 3 redirects/, 'image_fetch_failed'],
      ['/big', /larger than the 256 KiB limit|limit/, 'image_too_large'],
      ['/big-chunked', /limit/, 'image_too_large'],
      ['/hang', /took longer than 0.8 s/, 'image_fetch_timeout'],
      ['/missing', /HTTP 404/, 'image_fetch_failed'],
      ['/not-an-image', /not a PNG, JPEG, WebP or GIF/, 'unsupported_image_format'],
    ];
    for (const [p, message, code] of cases) {
      const e = await apiError(chat(s, { model: 'caprl', messages: imageMessage(`${srv.url}${p}`), max_tokens: 1 }));
      t.equal(e.status, 400, p);
      t.match(e.message, message, p);
      t.equal(e.code, code, p);
      t.equal(e.param, 'messages[0].content[0].image_url.url');
    }
    t.equal((await fetch(`${s.url}/health`)).status, 200, 'still healthy');
  });

  t.test('file:// images: inside --allowed-local-media-path only', async (t) => {
    const local = await chat(s, { model: 'caprl', messages: imageMessage(image), max_tokens: 1 });
    const inside = await chat(s, { model: 'caprl', messages: imageMessage(pathToFileURL(path.join(allowed, 'a.png')).href), max_tokens: 1 });
    t.equal(inside.usage!.prompt_tokens, local.usage!.prompt_tokens);
    for (const url of [pathToFileURL(path.join(media, 'outside.png')).href, `file://${allowed}/../outside.png`, pathToFileURL(path.join(allowed, 'escape.png')).href]) {
      const e = await apiError(chat(s, { model: 'caprl', messages: imageMessage(url), max_tokens: 1 }));
      t.equal(e.status, 400, url);
      t.equal(e.code, 'local_media_forbidden', url);
    }
  });

  t.test('/v1/completions: strings, lists, token ids, n, streaming, logprobs', async (t) => {
    const r = await s.client.completions.create({ model: 'caprl', prompt: 'Once upon a time', max_tokens: 8, temperature: 0 });
    t.match(r.id, /^cmpl-[0-9a-f]{32}$/);
    t.equal(r.object, 'text_completion');
    t.equal(r.model, 'caprl');
    t.equal(r.choices.length, 1);
    t.equal(r.choices[0]!.index, 0);
    t.type(r.choices[0]!.text, 'string');
    t.equal(r.choices[0]!.logprobs, null);
    const tok = await (await post(`${s.url}/tokenize`, { prompt: 'Once upon a time' })).json() as { count: number; tokens: number[] };
    t.equal(r.usage!.prompt_tokens, tok.count, 'prompt tokens as /tokenize counts them');

    const ids = await s.client.completions.create({ model: 'caprl', prompt: tok.tokens, max_tokens: 8, temperature: 0 });
    t.equal(ids.choices[0]!.text, r.choices[0]!.text, 'token-id prompt = its text');

    const list = await s.client.completions.create({ model: 'caprl', prompt: ['Once upon a time', 'The cat'], n: 2, max_tokens: 5, temperature: 0, ignore_eos: true } as OpenAI.CompletionCreateParamsNonStreaming);
    t.same(list.choices.map((c) => c.index), [0, 1, 2, 3], 'index = prompt * n + choice');
    t.equal(list.choices[0]!.text, list.choices[1]!.text);
    t.equal(list.usage!.completion_tokens, 20);
    const cat = await (await post(`${s.url}/tokenize`, { prompt: 'The cat' })).json() as { count: number };
    t.equal(list.usage!.prompt_tokens, tok.count + cat.count, 'each prompt counted once');

    const stream = await s.client.completions.create({ model: 'caprl', prompt: ['Once upon a time', 'The cat'], max_tokens: 5, temperature: 0, ignore_eos: true, stream: true, stream_options: { include_usage: true } } as OpenAI.CompletionCreateParamsStreaming);
    const chunks: OpenAI.Completion[] = [];
    for await (const c of stream) chunks.push(c);
    for (const i of [0, 1]) {
      const mine = chunks.filter((c) => c.choices[0]?.index === i);
      t.equal(mine.map((c) => c.choices[0]!.text).join(''), list.choices[i * 2]!.text, `streamed prompt ${i}`);
      t.equal(mine.filter((c) => c.choices[0]!.finish_reason).length, 1);
    }
    t.same(chunks[chunks.length - 1]!.usage, { prompt_tokens: list.usage!.prompt_tokens, completion_tokens: 10, total_tokens: list.usage!.prompt_tokens + 10 });

    const lp = await s.client.completions.create({ model: 'caprl', prompt: 'Once upon a time', max_tokens: 4, temperature: 0, ignore_eos: true, logprobs: 2 } as OpenAI.CompletionCreateParamsNonStreaming);
    const l = lp.choices[0]!.logprobs!;
    t.equal(l.tokens!.length, 4);
    t.equal(l.tokens!.join(''), lp.choices[0]!.text);
    t.same(l.text_offset, l.tokens!.map((_, k) => l.tokens!.slice(0, k).join('').length));
    t.ok(l.token_logprobs!.every((x) => x !== null && x <= 0));
    t.ok(l.top_logprobs!.every((d) => d !== null && Object.keys(d).length >= 1 && Object.keys(d).length <= 3));
    t.ok(l.tokens!.every((tk, k) => tk in l.top_logprobs![k]!), 'the sampled token is among its top entries');
  });

  t.test('/v1/completions errors', async (t) => {
    const bad: [Body, string, RegExp][] = [
      [{ prompt: 'x', echo: true }, 'echo', /`echo` is not supported/],
      [{ prompt: 'x', suffix: 'y' }, 'suffix', /`suffix` is not supported/],
      [{}, 'prompt', /`prompt` is required/],
      [{ prompt: [] }, 'prompt', /must not be empty/],
      [{ prompt: '' }, 'prompt', /must not be empty/],
      [{ prompt: [5000] }, 'prompt', /token ids in \[0, 2047\]/],
      [{ prompt: 'x', logprobs: 21 }, 'logprobs', /\[0, 20\]/],
      [{ prompt: 'x', max_tokens: 5000 }, 'max_tokens', /maximum context length is 1024/],
      [{ prompt: 'word '.repeat(1100) }, 'prompt', /maximum context length is 1024/],
      [{ prompt: 'x', n: 9 }, 'n', /\[1, 8\]/],
    ];
    for (const [body, param, message] of bad) {
      const e = await apiError(s.client.completions.create({ model: 'caprl', ...body } as unknown as OpenAI.CompletionCreateParamsNonStreaming));
      t.equal(e.status, 400, JSON.stringify(body).slice(0, 60));
      t.equal(e.param, param);
      t.match(e.message, message);
    }
    // " hello" as one id per byte-level piece is not how the tokenizer splits it.
    const ids = (await (await post(`${s.url}/tokenize`, { prompt: 'hello world' })).json() as { tokens: number[] }).tokens;
    const chars = (await Promise.all([...'hello world'].map(async (ch) => (await (await post(`${s.url}/tokenize`, { prompt: ch })).json() as { tokens: number[] }).tokens))).flat();
    if (chars.length !== ids.length) {
      const e = await apiError(s.client.completions.create({ model: 'caprl', prompt: chars, max_tokens: 1 }));
      t.equal(e.status, 400);
      t.match(e.message, /tokenizer's own segmentation/);
    }
    const nf = await apiError(s.client.completions.create({ model: 'nope', prompt: 'x' }));
    t.equal(nf.status, 404);
  });

  t.test('/tokenize and /detokenize', async (t) => {
    let res = await post(`${s.url}/tokenize`, { model: 'caprl', prompt: 'Hello world, ünïcödé ✨', return_token_strs: true });
    t.equal(res.status, 200);
    const tk = await res.json() as { count: number; max_model_len: number; tokens: number[]; token_strs: string[] };
    t.equal(tk.count, tk.tokens.length);
    t.equal(tk.max_model_len, 1024);
    t.equal(tk.token_strs.length, tk.count);
    res = await post(`${s.url}/detokenize`, { model: 'caprl', tokens: tk.tokens });
    t.same(await res.json(), { prompt: 'Hello world, ünïcödé ✨' }, 'round trip');
    const plain = await (await post(`${s.url}/tokenize`, { prompt: 'Hello' })).json() as { token_strs: unknown };
    t.equal(plain.token_strs, null);

    // Chat messages: the count is the prompt_tokens a chat request reports, images included.
    const messages = [{ role: 'system', content: 'You are a helpful assistant.' }, ...imageMessage(image)];
    const c = await chat(s, { model: 'caprl', messages, max_tokens: 1 });
    const mt = await (await post(`${s.url}/tokenize`, { messages })).json() as { count: number; tokens: number[] };
    t.equal(mt.count, c.usage!.prompt_tokens, 'count = chat prompt_tokens, image tokens included');
    const viaUrl = await (await post(`${s.url}/tokenize`, { messages: [messages[0], ...imageMessage(`${srv.url}/img.png`)] })).json() as { count: number };
    t.equal(viaUrl.count, mt.count, 'the same image by URL');
    const back = await (await post(`${s.url}/detokenize`, { tokens: mt.tokens })).json() as { prompt: string };
    t.match(back.prompt, /^<\|im_start\|>system\nYou are a helpful assistant\.<\|im_end\|>\n<\|im_start\|>user\n<\|vision_start\|>(<\|image_pad\|>){64}<\|vision_end\|>Describe the image\.<\|im_end\|>\n<\|im_start\|>assistant\n$/,
      'special tokens written out, as HF decode');
    const noGen = await (await post(`${s.url}/tokenize`, { messages: text, add_generation_prompt: false })).json() as { count: number };
    const gen = await (await post(`${s.url}/tokenize`, { messages: text })).json() as { count: number };
    t.ok(noGen.count < gen.count, 'add_generation_prompt');

    for (const [url, body, status, param] of [
      ['/tokenize', { model: 'nope', prompt: 'x' }, 404, 'model'],
      ['/tokenize', {}, 400, 'prompt'],
      ['/tokenize', { prompt: 5 }, 400, 'prompt'],
      ['/detokenize', { tokens: [1, -1] }, 400, 'tokens'],
      ['/detokenize', { tokens: 'abc' }, 400, 'tokens'],
      ['/detokenize', {}, 400, 'tokens'],
    ] as const) {
      const r = await post(`${s.url}${url}`, body);
      t.equal(r.status, status, `${url} ${JSON.stringify(body)}`);
      t.match(await r.json(), { error: { param, message: /./ } });
    }
  });

  t.test('/version, /ping, /health; wrong methods are 405 with an error object', async (t) => {
    const v = await fetch(`${s.url}/version`);
    t.equal(v.status, 200);
    t.match(await v.json(), { version: /^\d+\.\d+\.\d+/ });
    t.equal((await fetch(`${s.url}/ping`)).status, 200);
    t.equal((await fetch(`${s.url}/ping`, { method: 'POST' })).status, 200);
    const r = await fetch(`${s.baseURL}/chat/completions`);
    t.equal(r.status, 405);
    t.equal(r.headers.get('allow'), 'POST');
    t.match(await r.json(), { error: { message: /Method Not Allowed/, type: 'invalid_request_error' } });
    const nf = await fetch(`${s.url}/nope`);
    t.equal(nf.status, 404);
    t.match(await nf.json(), { error: { message: /Not Found/ } });
  });
});

t.test('--api-key: 401 on /v1/* without the key; /health, /ping, /version, /tokenize stay open', async (t) => {
  const s = await startTestServer({ server: { apiKeys: ['sekret-1', 'sekret-2'] } });
  t.teardown(() => s.close());
  const msg = [{ role: 'user' as const, content: 'hi' }];
  const wrong = new OpenAI({ baseURL: s.baseURL, apiKey: 'guessed-key', maxRetries: 0 });
  const e = await apiError(wrong.chat.completions.create({ model: 'caprl', messages: msg, max_tokens: 1 }));
  t.ok(e instanceof OpenAI.AuthenticationError);
  t.equal(e.status, 401);
  t.equal(e.code, 'invalid_api_key');
  t.equal(e.type, 'invalid_request_error');
  t.notMatch(e.message, /guessed-key/, 'the key sent is not echoed');
  t.notMatch(e.message, /sekret/, 'nor the real one');
  const m = await apiError(wrong.models.list());
  t.equal(m.status, 401);
  const c = await apiError(wrong.completions.create({ model: 'caprl', prompt: 'x', max_tokens: 1 }));
  t.equal(c.status, 401);
  let raw = await fetch(`${s.baseURL}/models`);
  t.equal(raw.status, 401, 'no Authorization header');
  t.match(await raw.json(), { error: { code: 'invalid_api_key', message: /API key/ } });
  raw = await fetch(`${s.baseURL}/models`, { headers: { authorization: 'Basic sekret-1' } });
  t.equal(raw.status, 401, 'not a bearer token');
  raw = await fetch(`${s.baseURL}/nope`);
  t.equal(raw.status, 401, 'unknown /v1 paths too (vLLM checks the prefix)');

  for (const key of ['sekret-1', 'sekret-2']) {
    const right = new OpenAI({ baseURL: s.baseURL, apiKey: key, maxRetries: 0 });
    const r = await right.chat.completions.create({ model: 'caprl', messages: msg, max_tokens: 1 });
    t.equal(r.choices.length, 1, `key ${key}`);
  }
  t.equal((await fetch(`${s.baseURL}/models`, { headers: { authorization: 'bearer sekret-2' } })).status, 200, 'scheme is case-insensitive');
  t.equal((await fetch(`${s.url}/health`)).status, 200);
  t.equal((await fetch(`${s.url}/ping`, { method: 'POST' })).status, 200);
  t.equal((await fetch(`${s.url}/version`)).status, 200);
  t.equal((await post(`${s.url}/tokenize`, { prompt: 'x' })).status, 200, 'vLLM leaves /tokenize outside /v1 open');
  t.not((await fetch(`${s.baseURL}/chat/completions`, { method: 'OPTIONS' })).status, 401, 'CORS preflight is not checked');
});
