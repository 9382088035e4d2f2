// Bad input never breaks the server: malformed JSON, wrong types, oversized bodies, bad base64,
// non-image bytes, truncated/corrupt PNG/JPEG/WebP/GIF, decompression bombs, 1x1 and
// 30000x30000 images, CMYK, 16-bit, alpha, animated and EXIF-rotated images, too many images,
// prompts longer than the context, out-of-range sampling fields, unknown models. Each gets
// OpenAI's error object with a message a user can act on (or, for odd but valid images, a
// caption), and the process stays up with its memory bounded.
import t, { type Test } from 'tap';
import { prepareImage } from '../src/images/prepare.js';
import { LLAMA_CPP_QWEN25VL_LIMITS } from '../src/images/qwen-resize.js';
import { dataUri, imageCases, picture } from './helpers/bad-images.js';
import { startTestServer, type TestServer } from './helpers/server.js';

interface Answer {
  status: number;
  body: unknown;
}

function checkError(t: Test, a: Answer, what: string, status: number | number[], message?: RegExp, param?: string | null): void {
  const statuses = Array.isArray(status) ? status : [status];
  t.ok(statuses.includes(a.status), `${what}: status ${a.status}, expected ${statuses.join(' or ')}`);
  const e = (a.body as { error?: Record<string, unknown> }).error;
  t.ok(e && typeof e === 'object', `${what}: an error object`);
  if (!e) return;
  t.same(Object.keys(e).sort(), ['code', 'message', 'param', 'type'], `${what}: OpenAI's four fields`);
  t.type(e.message, 'string');
  t.type(e.type, 'string');
  t.ok((e.message as string).length > 10 && (e.message as string).length < 2000, `${what}: a readable message`);
  t.ok(e.param === null || typeof e.param === 'string');
  t.ok(e.code === null || typeof e.code === 'string');
  if (message) t.match(e.message, message, `${what}: message`);
  if (param !== undefined) t.equal(e.param, param, `${what}: param`);
}

async function send(s: TestServer, body: string | Buffer, contentType = 'application/json'): Promise<Answer> {
  const res = await fetch(`${s.baseURL}/chat/completions`, { method: 'POST', headers: { 'content-type': contentType }, body: typeof body === 'string' ? body : new Uint8Array(body) });
  const text = await res.text();
  let parsed: unknown = text;
  try {
    parsed = JSON.parse(text);
  } catch {
    // left as text: checkError fails on it
  }
  return { status: res.status, body: parsed };
}

const chat = (extra: Record<string, unknown> = {}) => ({
  model: 'caprl', messages: [{ role: 'user', content: 'Describe.' }], max_tokens: 2, ...extra,
});
const withImage = (url: string, extra: Record<string, unknown> = {}) => chat({
  messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url } }, { type: 'text', text: 'Describe.' }] }], ...extra,
});

t.test('bad input on the tiny model', async (t) => {
  const s = await startTestServer({
    engine: { nThreads: 1, maxModelLen: 1024 },
    server: { bodyLimit: 2 * 1024 * 1024, limitImagesPerPrompt: 8, maxNumSeqs: 8 },
  });
  t.teardown(() => s.close());
  const rss0 = process.memoryUsage().rss;
  const json = (v: unknown) => send(s, JSON.stringify(v));

  t.test('malformed and mistyped bodies', async (t) => {
    checkError(t, await send(s, '{"model": "caprl", "messages": ['), 'truncated JSON', 400, /not valid JSON/);
    checkError(t, await send(s, '{"model": caprl}'), 'bare word', 400, /not valid JSON/);
    checkError(t, await send(s, ''), 'empty body', 400, /empty/);
    checkError(t, await send(s, 'null'), 'null', 400, /JSON object/);
    checkError(t, await send(s, '[1, 2]'), 'array', 400, /JSON object/);
    checkError(t, await send(s, '"hello"'), 'string', 400, /JSON object/);
    checkError(t, await send(s, '42'), 'number', 400, /JSON object/);
    checkError(t, await send(s, '['.repeat(100_000) + ']'.repeat(100_000)), 'deeply nested', 400);
    checkError(t, await send(s, '{"__proto__": {"x": 1}, "messages": []}'), 'prototype poisoning', 400);
    checkError(t, await send(s, Buffer.from([0x7b, 0xff, 0xfe, 0x7d])), 'invalid UTF-8', 400);
    checkError(t, await send(s, '{"messages": []}', 'text/plain'), 'text/plain', 415, /Content-Type/);
    checkError(t, await send(s, 'a=b', 'application/x-www-form-urlencoded'), 'form body', 415);
    checkError(t, await send(s, JSON.stringify(chat({ messages: [{ role: 'user', content: 'x'.repeat(3 * 1024 * 1024) }] }))), 'oversized body', 413, /too large/);
    checkError(t, await json({ messages: 'hi' }), 'messages a string', 400, /messages/, 'messages');
    checkError(t, await json({ messages: [] }), 'no messages', 400, /at least one/, 'messages');
    checkError(t, await json({ messages: [5] }), 'message a number', 400, /must be an object/, 'messages[0]');
    checkError(t, await json({ messages: [{ role: 'wizard', content: 'x' }] }), 'unknown role', 400, /role/, 'messages[0].role');
    checkError(t, await json({ messages: [{ role: 'user', content: 7 }] }), 'content a number', 400, /content/, 'messages[0].content');
    checkError(t, await json({ messages: [{ role: 'user', content: [{ type: 'audio', data: 'x' }] }] }), 'unknown part', 400, /"text" or "image_url"|not supported/);
    checkError(t, await json({ messages: [{ role: 'user', content: [{ type: 'image_url' }] }] }), 'image_url without url', 400, /image_url/);
    checkError(t, await json({ messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 42 } }] }] }), 'url a number', 400, /image_url/);
    checkError(t, await json({ messages: [{ role: 'user', content: [{ type: 'text', text: ['a'] }] }] }), 'text an array', 400, /text/);
    checkError(t, await json(chat({ model: 7 })), 'model a number', 400, /model/, 'model');
    checkError(t, await json(chat({ stream: 'yes' })), 'stream a string', 400, /stream/, 'stream');
    checkError(t, await json(chat({ max_tokens: '10' })), 'max_tokens a string', 400, /max_tokens/, 'max_tokens');
    checkError(t, await json(chat({ temperature: 'hot' })), 'temperature a string', 400, /temperature/, 'temperature');
    checkError(t, await json(chat({ stop: 5 })), 'stop a number', 400, /stop/, 'stop');
    checkError(t, await json(chat({ seed: 'x' })), 'seed a string', 400, /seed/, 'seed');
    checkError(t, await json(chat({ seed: 1e30 })), 'seed too large', 400, /seed/, 'seed');
    checkError(t, await json(chat({ logit_bias: { 1: 5 } })), 'logit_bias', 400, /not supported/, 'logit_bias');
  });

  t.test('out-of-range sampling fields, unknown models, context', async (t) => {
    checkError(t, await json(chat({ model: 'gpt-4o' })), 'unknown model', 404, /The model `gpt-4o` does not exist/, 'model');
    for (const n of [0, -1, 1.5]) checkError(t, await json(chat({ n })), `n ${n}`, 400, /`n`/, 'n');
    checkError(t, await json(chat({ n: 1000 })), 'n above max-num-seqs', 400, /`n`/, 'n');
    for (const max_tokens of [0, -5, 2.5]) checkError(t, await json(chat({ max_tokens })), `max_tokens ${max_tokens}`, 400, /max_tokens/, 'max_tokens');
    checkError(t, await json(chat({ max_tokens: 1e9 })), 'max_tokens beyond the context', 400, /maximum context length is 1024 tokens/);
    for (const temperature of [-1, -0.001]) checkError(t, await json(chat({ temperature })), `temperature ${temperature}`, 400, /temperature/, 'temperature');
    for (const top_p of [0, 1.5, -1]) checkError(t, await json(chat({ top_p })), `top_p ${top_p}`, 400, /top_p/, 'top_p');
    checkError(t, await json(chat({ top_k: -7 })), 'top_k -7', 400, /top_k/, 'top_k');
    checkError(t, await json(chat({ presence_penalty: 9 })), 'presence_penalty 9', 400, /presence_penalty/);
    checkError(t, await json(chat({ logprobs: true, top_logprobs: 500 })), 'top_logprobs 500', 400, /top_logprobs/);
    checkError(t, await json(chat({ min_tokens: 5, max_tokens: 2 })), 'min_tokens > max_tokens', 400, /min_tokens/);
    checkError(t, await json(chat({ messages: [{ role: 'user', content: 'word '.repeat(2000) }] })), 'prompt longer than the context', 400, /maximum context length is 1024 tokens/, 'messages');
    checkError(t, await json(chat({ messages: Array.from({ length: 3000 }, () => ({ role: 'user', content: 'hi' })) })), '3000 messages', 400, /maximum context length/);
  });

  t.test('images: every odd but valid one is captioned, every broken one refused with a reason', async (t) => {
    const cases = await imageCases();
    for (const c of cases) {
      const a = await json(withImage(dataUri(c.bytes)));
      if (c.expect === 'ok') {
        t.equal(a.status, 200, `${c.name}: captioned`);
        t.match(a.body, { object: 'chat.completion', choices: [{ message: { role: 'assistant' } }] });
        if (c.oriented) {
          const p = await prepareImage(c.bytes, LLAMA_CPP_QWEN25VL_LIMITS);
          t.same([p.originalWidth, p.originalHeight], c.oriented, `${c.name}: decoded as ${c.oriented.join('x')}`);
        }
      } else {
        checkError(t, a, c.name, 400, c.message, 'messages[0].content[0].image_url.url');
      }
    }
  });

  t.test('bad data URIs and URLs', async (t) => {
    const param = 'messages[0].content[0].image_url.url';
    checkError(t, await json(withImage('data:image/png;base64,@@@notbase64@@@')), 'bad base64', 400, /not valid base64/, param);
    checkError(t, await json(withImage('data:image/png;base64,')), 'no data', 400, /no data/, param);
    checkError(t, await json(withImage('data:image/png,plain')), 'not base64', 400, /base64/, param);
    checkError(t, await json(withImage('data:text/html;base64,PGh0bWw+')), 'text/html', 400, /image/, param);
    checkError(t, await json(withImage(`data:image/png;base64,${Buffer.from('GIF89a but not really').toString('base64')}`)), 'GIF signature, no GIF', 400, /decode/, param);
    checkError(t, await json(withImage('javascript:alert(1)')), 'javascript: URL', 400, /data:|http/, param);
    checkError(t, await json(withImage('file:///etc/passwd')), 'file: URL without the flag', 400, /allowed-local-media-path/, param);
    checkError(t, await json(withImage('http://169.254.169.254/latest/meta-data/')), 'metadata service', 400, /link-local.*--allow-private-image-urls/, param);
    checkError(t, await json(withImage('http://[::1]:1/x.png')), 'loopback v6', 400, /loopback/, param);
    checkError(t, await json(withImage('http://')), 'empty host', 400, undefined, param);
  });

  t.test('too many images', async (t) => {
    const small = dataUri(await picture(56, 56).png().toBuffer());
    const nine = Array.from({ length: 9 }, () => ({ type: 'image_url', image_url: { url: small } }));
    checkError(t, await json(chat({ messages: [{ role: 'user', content: [...nine, { type: 'text', text: 'x' }] }] })), 'more than --limit-mm-per-prompt', 400, /at most 8|limit|8 image/);
    const big = dataUri(await picture(448, 448).png().toBuffer());
    const many = Array.from({ length: 6 }, () => ({ type: 'image_url', image_url: { url: big } }));
    checkError(t, await json(chat({ messages: [{ role: 'user', content: [...many, { type: 'text', text: 'x' }] }] })), 'images beyond the context', 400, /maximum context length is 1024 tokens/);
  });

  t.test('a burst of broken requests at once, then the server still works', async (t) => {
    const cases = await imageCases();
    const bodies = [
      ...cases.map((c) => JSON.stringify(withImage(dataUri(c.bytes)))),
      '{', '[]', JSON.stringify(chat({ n: 0 })), JSON.stringify(chat({ model: 'nope' })),
    ];
    const answers = await Promise.all(bodies.map((b) => send(s, b)));
    t.ok(answers.every((a) => a.status === 200 || (a.status >= 400 && a.status < 500)), 'every answer is a success or a client error');
    t.ok(answers.every((a) => a.status === 200 || (a.body as { error?: unknown }).error), 'every error is an error object');
    t.equal((await fetch(`${s.url}/health`)).status, 200);
    const ok = await s.client.chat.completions.create({ model: 'caprl', messages: [{ role: 'user', content: 'still there?' }], max_tokens: 2 });
    t.equal(ok.choices[0]!.message.role, 'assistant');
    t.equal(s.engine.liveCount, 0);
    const grown = (process.memoryUsage().rss - rss0) / 2 ** 20;
    t.ok(grown < 512, `RSS grew ${grown.toFixed(0)} MiB over all the bad input (bounded)`);
  });
});
