// End to end: the real server (tiny model, native engine) called with the official `openai`
// client and with raw HTTP where the client hides the wire.
import t from 'tap';
import OpenAI from 'openai';
import { toTemplateMessages } from '../src/serving/prompt.js';
import { validateChatRequest } from '../src/serving/validate.js';
import { prepareImageFromDataUri } from '../src/images/prepare.js';
import { LLAMA_CPP_QWEN25VL_LIMITS } from '../src/images/qwen-resize.js';
import { apiError, pngDataUri, startTestServer, waitFor, type TestServer } from './helpers/server.js';

const GREEDY = { temperature: 0 } as const;

t.test('OpenAI-compatible server on the tiny model', async (t) => {
  // max_model_len 1024 keeps "fill the context" requests short.
  const s: TestServer = await startTestServer({ engine: { maxModelLen: 1024 }, server: { bodyLimit: 4 * 1024 * 1024 } });
  t.teardown(() => s.close());
  const image = await pngDataUri(224, 224);

  t.test("the seed's request: an image and a prompt, no max_tokens", async (t) => {
    const r = await s.client.chat.completions.create({
      model: 'caprl',
      messages: [{
        role: 'user',
        content: [
          { type: 'image_url', image_url: { url: image } },
          { type: 'text', text: 'Please describe this image in detail' },
        ],
      }],
    });
    t.match(r.id, /^chatcmpl-[0-9a-f]{32}$/);
    t.equal(r.object, 'chat.completion');
    t.equal(r.model, 'caprl');
    t.ok(Math.abs(r.created - Date.now() / 1000) < 600, 'created is now, in seconds');
    t.equal(r.choices.length, 1);
    const c = r.choices[0]!;
    t.equal(c.index, 0);
    t.equal(c.message.role, 'assistant');
    t.type(c.message.content, 'string');
    t.ok(c.finish_reason === 'stop' || c.finish_reason === 'length', `finish_reason ${c.finish_reason}`);
    const u = r.usage!;
    t.ok(u.prompt_tokens > 64, `prompt counts the 64 image tokens of a 224x224 image (${u.prompt_tokens})`);
    t.equal(u.total_tokens, u.prompt_tokens + u.completion_tokens);
    if (c.finish_reason === 'length') {
      t.equal(u.prompt_tokens + u.completion_tokens, 1024, 'without max_tokens the completion fills max_model_len (vLLM)');
    }
  });

  t.test('the prompt-token count of /tokenize\'s path (image sizes alone) matches the generation\'s, text and images', async (t) => {
    // 56x56 is inside HF's limits but under llama.cpp's 6272 px minimum: it must reach the
    // engine already grown to 84x84, or the engine would resize it and count 9 tokens, not 4.
    for (const [w, h, text] of [[224, 264, 'Describe.'], [100, 140, 'Bonjour, décris cette image ✨'], [56, 56, 'small']] as const) {
      const uri = await pngDataUri(w, h);
      const body = {
        model: 'caprl',
        messages: [{ role: 'user', content: [{ type: 'text', text }, { type: 'image_url', image_url: { url: uri } }] }],
        max_tokens: 1,
      };
      const v = validateChatRequest(body, { servedModelNames: ['caprl'] });
      const { templateMessages } = toTemplateMessages(v.messages, s.engine.info.mediaMarker);
      const prompt = s.engine.applyChatTemplate(templateMessages, true);
      const img = await prepareImageFromDataUri(uri, LLAMA_CPP_QWEN25VL_LIMITS);
      const ours = s.engine.tokenizePrompt(prompt, [img]).reduce<number>((n, p) => n + (typeof p === 'number' ? p : p.length), 0);
      const r = await s.client.chat.completions.create(body as OpenAI.ChatCompletionCreateParamsNonStreaming);
      t.equal(ours, r.usage!.prompt_tokens, `${img.width}x${img.height} image`);
    }
  });

  t.test('streaming with usage matches the non-streamed completion', async (t) => {
    const params = {
      model: 'caprl',
      messages: [{ role: 'user' as const, content: [
        { type: 'image_url' as const, image_url: { url: image } },
        { type: 'text' as const, text: 'What is in the picture?' },
      ] }],
      max_tokens: 24,
      ...GREEDY,
    };
    const whole = await s.client.chat.completions.create(params);
    const stream = await s.client.chat.completions.create({ ...params, stream: true, stream_options: { include_usage: true } });
    const chunks: OpenAI.ChatCompletionChunk[] = [];
    for await (const ch of stream) chunks.push(ch);
    t.ok(chunks.length >= 3);
    const first = chunks[0]!;
    t.same(first.choices[0]!.delta, { role: 'assistant', content: '' }, 'first chunk: the role');
    t.ok(chunks.every((ch) => ch.object === 'chat.completion.chunk' && ch.id === first.id && ch.model === 'caprl'));
    const text = chunks.map((ch) => ch.choices[0]?.delta.content ?? '').join('');
    t.equal(text, whole.choices[0]!.message.content, 'same greedy text');
    const withFinish = chunks.filter((ch) => ch.choices[0]?.finish_reason);
    t.equal(withFinish.length, 1);
    t.equal(withFinish[0]!.choices[0]!.finish_reason, whole.choices[0]!.finish_reason);
    const last = chunks[chunks.length - 1]!;
    t.same(last.choices, [], 'usage chunk has no choices');
    t.same(last.usage, whole.usage);
    t.ok(chunks.slice(0, -1).every((ch) => ch.usage === null), 'usage: null before the last chunk');
  });

  t.test('the SSE wire format ends with [DONE]', async (t) => {
    const res = await fetch(`${s.baseURL}/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'caprl', messages: [{ role: 'user', content: 'hi' }], max_tokens: 4, stream: true, ...GREEDY }),
    });
    t.equal(res.status, 200);
    t.match(res.headers.get('content-type'), /^text\/event-stream/);
    const body = await res.text();
    t.ok(body.endsWith('data: [DONE]\n\n'));
    const events = body.split('\n\n').filter(Boolean);
    t.ok(events.every((e) => e.startsWith('data: ')));
    const chunks = events.slice(0, -1).map((e) => JSON.parse(e.slice(6)));
    t.notOk(chunks.some((c) => 'usage' in c), 'no usage field without include_usage');
    t.equal(chunks[chunks.length - 1].choices[0].finish_reason, 'length');
  });

  t.test('a system message replaces the default one', async (t) => {
    const plain = await s.client.chat.completions.create({ model: 'caprl', messages: [{ role: 'user', content: 'Hello' }], max_tokens: 2 });
    const sys = await s.client.chat.completions.create({
      model: 'caprl',
      messages: [{ role: 'system', content: 'You are a terse captioner who answers in five words or fewer.' }, { role: 'user', content: 'Hello' }],
      max_tokens: 2,
    });
    t.equal(sys.choices[0]!.message.role, 'assistant');
    t.not(sys.usage!.prompt_tokens, plain.usage!.prompt_tokens, 'the system text is in the prompt');
  });

  t.test('max_tokens, stop strings, logprobs, seeds', async (t) => {
    const base = { model: 'caprl', messages: [{ role: 'user' as const, content: 'Tell me a story.' }] };
    const r = await s.client.chat.completions.create({ ...base, max_tokens: 12, ...GREEDY, ignore_eos: true } as OpenAI.ChatCompletionCreateParamsNonStreaming);
    t.equal(r.usage!.completion_tokens, 12);
    t.equal(r.choices[0]!.finish_reason, 'length');
    const text = r.choices[0]!.message.content!;

    // A stop string taken from the greedy text ends it there, and vLLM's stop_reason names it.
    const at = Math.max(1, Math.floor(text.length / 2));
    const stop = text.slice(at, at + 2);
    if (stop.length === 2 && text.indexOf(stop) > 0) {
      const st = await s.client.chat.completions.create({ ...base, max_tokens: 12, ...GREEDY, ignore_eos: true, stop } as OpenAI.ChatCompletionCreateParamsNonStreaming);
      t.equal(st.choices[0]!.message.content, text.slice(0, text.indexOf(stop)));
      t.equal(st.choices[0]!.finish_reason, 'stop');
      t.equal((st.choices[0] as unknown as { stop_reason: unknown }).stop_reason, stop);
    }

    const lp = await s.client.chat.completions.create({ ...base, max_tokens: 5, ...GREEDY, logprobs: true, top_logprobs: 3 });
    const content = lp.choices[0]!.logprobs!.content!;
    t.equal(content.length, lp.usage!.completion_tokens, 'one entry per token');
    for (const e of content) {
      t.type(e.token, 'string');
      t.ok(e.logprob <= 0);
      t.same(e.bytes, [...Buffer.from(e.token, 'utf8')]);
      t.equal(e.top_logprobs.length, 3);
      t.ok(e.top_logprobs[0]!.logprob >= e.top_logprobs[2]!.logprob, 'top alternatives sorted');
    }
    t.equal(content.map((e) => e.token).join(''), lp.choices[0]!.message.content);
    const nolp = await s.client.chat.completions.create({ ...base, max_tokens: 2 });
    t.equal(nolp.choices[0]!.logprobs, null);

    const sampled = { ...base, max_tokens: 16, temperature: 1.0, seed: 1234 };
    const a = await s.client.chat.completions.create(sampled);
    const b = await s.client.chat.completions.create(sampled);
    t.equal(a.choices[0]!.message.content, b.choices[0]!.message.content, 'same seed, same text');
  });

  t.test('/v1/models and /health', async (t) => {
    const models = await s.client.models.list();
    t.equal(models.data.length, 1);
    t.match(models.data[0], { id: 'caprl', object: 'model', owned_by: 'caprl', root: s.model, max_model_len: 1024 });
    const h = await fetch(`${s.url}/health`);
    t.equal(h.status, 200);
    t.equal(await h.text(), '');
  });

  t.test('bad requests: 400 with the field named; unknown model: 404', async (t) => {
    const msg = [{ role: 'user' as const, content: 'hi' }];
    let e = await apiError(s.client.chat.completions.create({ model: 'caprl', messages: msg, temperature: -1 }));
    t.equal(e.status, 400);
    t.equal(e.param, 'temperature');
    t.match(e.message, /temperature/);
    t.equal(e.type, 'invalid_request_error');

    e = await apiError(s.client.chat.completions.create({ model: 'gpt-4o', messages: msg }));
    t.ok(e instanceof OpenAI.NotFoundError);
    t.equal(e.status, 404);
    t.match(e.message, /The model `gpt-4o` does not exist/);

    e = await apiError(s.client.chat.completions.create({ model: 'caprl', messages: msg, n: 9 }));
    t.equal(e.status, 400);
    t.equal(e.param, 'n');
    t.match(e.message, /must be in \[1, 8\]/, 'n above --max-num-seqs');

    e = await apiError(s.client.chat.completions.create({ model: 'caprl', messages: msg, max_tokens: 5000 }));
    t.equal(e.status, 400);
    t.match(e.message, /This model's maximum context length is 1024 tokens\. However, you requested \d+ tokens \(\d+ in the messages, 5000 in the completion\)/);

    e = await apiError(s.client.chat.completions.create({ model: 'caprl', messages: [{ role: 'user', content: 'word '.repeat(1100) }] }));
    t.equal(e.status, 400);
    t.equal(e.param, 'messages', 'the prompt\'s field, as vLLM names it');
    t.equal(e.code, 'context_length_exceeded');
    t.match(e.message, /maximum context length is 1024 tokens/);

    e = await apiError(s.client.chat.completions.create({
      model: 'caprl',
      messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'ftp://example.com/a.png' } }] }],
    }));
    t.equal(e.status, 400);
    t.equal(e.param, 'messages[0].content[0].image_url.url');
    t.match(e.message, /data: URI .*http\(s\):\/\/ URL or a file:\/\/ URL/);

    e = await apiError(s.client.chat.completions.create({
      model: 'caprl',
      messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'data:image/png;base64,bm90IGFuIGltYWdl' } }] }],
    }));
    t.equal(e.status, 400);
    t.match(e.message, /does not hold a PNG, JPEG, WebP or GIF/);

    e = await apiError(s.client.chat.completions.create({ model: 'caprl', messages: [] }));
    t.equal(e.status, 400);
    t.equal(e.param, 'messages');
  });

  t.test('raw HTTP errors are OpenAI error objects', async (t) => {
    const post = (body: string, type = 'application/json') =>
      fetch(`${s.baseURL}/chat/completions`, { method: 'POST', headers: { 'content-type': type }, body });
    let r = await post('{"model": "caprl", "messages": [');
    t.equal(r.status, 400);
    t.match(await r.json(), { error: { type: 'invalid_request_error', message: /not valid JSON/ } });
    r = await post('');
    t.equal(r.status, 400);
    r = await post(JSON.stringify({ model: 'caprl', messages: [{ role: 'user', content: 'x'.repeat(5 * 1024 * 1024) }] }));
    t.equal(r.status, 413);
    t.match(await r.json(), { error: { message: /too large/ } });
    r = await post('{"messages": []}', 'text/plain');
    t.equal(r.status, 415);
    t.match(await r.json(), { error: { message: /Content-Type/ } });
    r = await fetch(`${s.baseURL}/completions-nope`);
    t.equal(r.status, 404);
    t.match(await r.json(), { error: { message: /Not Found/ } });
    // The server is still fine.
    t.equal((await fetch(`${s.url}/health`)).status, 200);
  });

  t.test('a client that disconnects frees its request at once', async (t) => {
    const long = {
      model: 'caprl',
      messages: [{ role: 'user', content: 'Go on and on.' }],
      max_tokens: 900, ignore_eos: true, ...GREEDY,
    };
    // Streaming: read the first chunk, then drop the connection.
    const ac = new AbortController();
    const res = await fetch(`${s.baseURL}/chat/completions`, {
      method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ ...long, stream: true }), signal: ac.signal,
    });
    const reader = res.body!.getReader();
    await reader.read();
    t.equal(s.engine.liveCount, 1, 'generating');
    const before = s.engine.stats().generationTokensTotal;
    ac.abort();
    t.ok(await waitFor(() => s.engine.liveCount === 0, 5000), 'stream: the generation ended');
    t.ok(s.engine.stats().generationTokensTotal - before < 900, 'stream: it stopped early');

    // Non-streaming: abort while it runs.
    const ac2 = new AbortController();
    const p = fetch(`${s.baseURL}/chat/completions`, {
      method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(long), signal: ac2.signal,
    }).catch((err: unknown) => err);
    t.ok(await waitFor(() => s.engine.liveCount === 1, 5000), 'non-stream: generating');
    const before2 = s.engine.stats().generationTokensTotal;
    ac2.abort();
    await p;
    t.ok(await waitFor(() => s.engine.liveCount === 0, 5000), 'non-stream: the generation ended');
    t.ok(s.engine.stats().generationTokensTotal - before2 < 900, 'non-stream: it stopped early');
    t.ok(await waitFor(() => s.engine.stats().kvUsedCells === 0, 5000), 'KV cells freed');
    t.equal((await fetch(`${s.url}/health`)).status, 200);
  });

  t.test('concurrent requests all complete', async (t) => {
    const rs = await Promise.all(Array.from({ length: 6 }, (_, i) => s.client.chat.completions.create({
      model: 'caprl',
      messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: image } }, { type: 'text', text: `Caption ${i}` }] }],
      max_tokens: 8, ...GREEDY,
    })));
    t.ok(rs.every((r) => r.choices[0]!.message.role === 'assistant' && r.usage!.completion_tokens <= 8));
  });
});

t.test('without --mmproj, images are refused with 400', async (t) => {
  const s = await startTestServer({ textOnly: true });
  t.teardown(() => s.close());
  const e = await apiError(s.client.chat.completions.create({
    model: 'caprl',
    messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: await pngDataUri(56, 56) } }, { type: 'text', text: 'x' }] }],
  }));
  t.equal(e.status, 400);
  t.match(e.message, /--mmproj/);
  const ok = await s.client.chat.completions.create({ model: 'caprl', messages: [{ role: 'user', content: 'text is fine' }], max_tokens: 2 });
  t.equal(ok.choices[0]!.message.role, 'assistant');
});
