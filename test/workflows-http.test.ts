// The workflow routes on the real server (tiny model): POST /v1/captions with multipart uploads
// (and JSON image URLs), its limits and OpenAI error objects; POST /v1/rewards/caprl and CapRL's
// /get_reward: structure, counts, the reward arithmetic on the answers given, determinism under
// a seed (shuffles included), validation.
import t from 'tap';
import sharp from 'sharp';
import { pngDataUri, startTestServer, type TestServer } from './helpers/server.js';

const FILE_LIMIT = 40_000;

async function png(seed: number, w = 64, h = 64): Promise<Buffer> {
  const raw = Buffer.alloc(w * h * 3);
  for (let i = 0; i < raw.length; i++) raw[i] = (i * (seed + 5) * 13 + seed) & 255;
  return sharp(raw, { raw: { width: w, height: h, channels: 3 } }).png().toBuffer();
}

interface ErrorBody {
  error: { message: string; type: string; param: string | null; code: string | null };
}

t.test('workflow routes', async (t) => {
  const s: TestServer = await startTestServer({
    engine: { nThreads: 1, maxSeqs: 4, maxModelLen: 2048 },
    uploadLimits: { fileSize: FILE_LIMIT, files: 3, totalSize: 2 * FILE_LIMIT },
  });
  t.teardown(() => s.close());
  const a = await png(1);
  const b = await png(2);

  const upload = async (files: [string, Buffer, string?][], fields: Record<string, string | string[]> = {}) => {
    const fd = new FormData();
    for (const [name, bytes, filename] of files) fd.append(name, new Blob([new Uint8Array(bytes)], { type: 'image/png' }), filename ?? `${name}.png`);
    for (const [k, v] of Object.entries(fields)) for (const x of Array.isArray(v) ? v : [v]) fd.append(k, x);
    const res = await fetch(`${s.url}/v1/captions`, { method: 'POST', body: fd });
    return { status: res.status, body: (await res.json()) as Record<string, unknown> };
  };

  t.test('uploads: one caption per image', async (t) => {
    const r = await upload([['file', a, 'a.png'], ['file', b, 'b.png'], ['file', a, 'a-again.png']], { max_tokens: '4', temperature: '0', prompt: 'Describe this image.' });
    t.equal(r.status, 200, JSON.stringify(r.body));
    t.match(r.body, { object: 'caption.list', model: 'caprl', id: /^captions-[0-9a-f]{32}$/ });
    const data = r.body.data as { index: number; filename: string; caption: string; finish_reason: string; usage: { prompt_tokens: number; completion_tokens: number; total_tokens: number } }[];
    t.same(data.map((d) => [d.index, d.filename]), [[0, 'a.png'], [1, 'b.png'], [2, 'a-again.png']]);
    for (const d of data) {
      t.type(d.caption, 'string');
      t.ok(d.usage.prompt_tokens > 9 && d.usage.completion_tokens >= 1 && d.usage.completion_tokens <= 4);
      t.equal(d.usage.total_tokens, d.usage.prompt_tokens + d.usage.completion_tokens);
    }
    const u = r.body.usage as { prompt_tokens: number; completion_tokens: number };
    t.equal(u.prompt_tokens, data.reduce((x, d) => x + d.usage.prompt_tokens, 0), 'usage sums the images');
    t.equal(u.completion_tokens, data.reduce((x, d) => x + d.usage.completion_tokens, 0));
    const again = await upload([['file', a, 'a.png']], { max_tokens: '4', temperature: '0', prompt: 'Describe this image.' });
    const alone = await upload([['file', a, 'a.png']], { max_tokens: '4', temperature: '0', prompt: 'Describe this image.' });
    t.equal((again.body.data as { caption: string }[])[0]!.caption, (alone.body.data as { caption: string }[])[0]!.caption, 'greedy: the same image, the same caption');
  });

  t.test('uploads: n captions per image, seeded', async (t) => {
    const fields = { max_tokens: '3', n: '2', seed: '9', temperature: '1' };
    const r1 = await upload([['image', a]], fields);
    const r2 = await upload([['image', a]], fields);
    t.equal(r1.status, 200, JSON.stringify(r1.body));
    const d1 = (r1.body.data as { captions: string[]; finish_reasons: string[] }[])[0]!;
    t.equal(d1.captions.length, 2);
    t.equal(d1.finish_reasons.length, 2);
    t.same((r2.body.data as { captions: string[] }[])[0]!.captions, d1.captions, 'same seed, same captions');
  });

  t.test('JSON image URLs', async (t) => {
    const res = await fetch(`${s.url}/v1/captions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ images: [await pngDataUri(64, 64), { url: await pngDataUri(80, 60) }], max_tokens: 2 }),
    });
    t.equal(res.status, 200);
    const body = (await res.json()) as { data: { index: number; caption: string; filename?: string }[] };
    t.equal(body.data.length, 2);
    t.notOk('filename' in body.data[0]!);
    const bad = await fetch(`${s.url}/v1/captions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ images: ['http://'], max_tokens: 2 }) });
    t.equal(bad.status, 400);
    t.match(await bad.json(), { error: { param: 'images[0]' } });
  });

  t.test('the same errors as chat, as OpenAI error objects', async (t) => {
    const cases: [string, () => Promise<{ status: number; body: Record<string, unknown> }>, number, Partial<ErrorBody['error']>][] = [
      ['no file', () => upload([], { max_tokens: '2' }), 400, { param: 'file', type: 'invalid_request_error' }],
      ['bad temperature', () => upload([['file', a]], { temperature: '-1' }), 400, { param: 'temperature' }],
      ['not a number', () => upload([['file', a]], { max_tokens: 'many' }), 400, { param: 'max_tokens' }],
      ['unknown model', () => upload([['file', a]], { model: 'gpt-4' }), 404, { code: 'model_not_found' }],
      ['stream', () => upload([['file', a]], { stream: 'true' }), 400, { param: 'stream' }],
      ['not an image', () => upload([['file', Buffer.from('hello world')]]), 400, { param: 'file[0]', code: 'unsupported_image_format' }],
      ['broken PNG', () => upload([['file', a], ['file', Buffer.concat([a.subarray(0, 40), Buffer.alloc(100)])]]), 400, { param: 'file[1]', code: 'image_decode_failed' }],
      ['too large', () => upload([['file', Buffer.concat([a, Buffer.alloc(FILE_LIMIT)])]]), 413, { code: 'file_too_large' }],
      ['too many files', () => upload([['file', a], ['file', a], ['file', a], ['file', a]]), 413, { code: 'too_many_files' }],
      ['too many bytes', () => upload([['file', Buffer.concat([a, Buffer.alloc(FILE_LIMIT - a.length - 10)])], ['file', Buffer.concat([a, Buffer.alloc(FILE_LIMIT - a.length - 10)])], ['file', a]]), 413, { code: 'request_too_large' }],
      ['prompt with the media marker', () => upload([['file', a]], { prompt: `x ${s.engine.info.mediaMarker}` }), 400, { param: 'prompt' }],
      ['context exceeded', () => upload([['file', a]], { max_tokens: '5000' }), 400, { code: 'context_length_exceeded' }],
    ];
    for (const [name, send, status, err] of cases) {
      const r = await send();
      t.equal(r.status, status, `${name}: ${JSON.stringify(r.body)}`);
      t.match(r.body, { error: { ...err, message: String } }, name);
    }
    // The server is fine afterwards.
    t.equal((await upload([['file', b]], { max_tokens: '2' })).status, 200);
  });

  const Q1 = { question: 'What color is the dog?\n   - A) Brown\n   - B) White\n   - C) Black\n   - D) Gray', answer: 'C' };
  const Q2 = { question: 'How many people are there?', options: ['one', 'two', 'three'], answer: 'B' };
  const reward = async (body: unknown, path = '/v1/rewards/caprl') => {
    const res = await fetch(`${s.url}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    return { status: res.status, body: (await res.json()) as Record<string, unknown> };
  };

  t.test('/v1/rewards/caprl: rewards are the fraction of right answers', async (t) => {
    const body = {
      items: [
        { caption: 'A black dog sits next to two people.', questions: [Q1, Q2] },
        { caption: 'An empty beach at dawn.', questions: [Q2] },
      ],
      samples_per_question: 2,
      shuffle_options: true,
      seed: 7,
      // Greedy answers: the engine guarantees text-only greedy tokens whatever the batching.
      temperature: 0,
      return_details: true,
    };
    const r = await reward(body);
    t.equal(r.status, 200, JSON.stringify(r.body));
    t.match(r.body, { object: 'caprl.reward', model: 'caprl' });
    const data = r.body.data as { index: number; reward: number; correct: number; total: number; details: { expected: string; predicted: string | null; correct: boolean; asked: string; response: string }[] }[];
    t.same(data.map((d) => d.total), [4, 2], 'questions x samples');
    for (const d of data) {
      t.equal(d.details.length, d.total);
      t.equal(d.correct, d.details.filter((x) => x.correct).length);
      t.equal(d.reward, d.correct / d.total);
      for (const x of d.details) {
        t.equal(x.correct, x.predicted === x.expected, 'right iff the letter read is the expected one');
        t.match(x.asked, /Can not answer based on the caption$/);
        t.type(x.response, 'string');
      }
    }
    t.same(r.body.rewards, data.map((d) => d.reward));
    const u = r.body.usage as { prompt_tokens: number; completion_tokens: number; total_tokens: number };
    t.ok(u.prompt_tokens > 0 && u.completion_tokens > 0 && u.completion_tokens <= 6 * 10);
    // Shuffled options: the expected letter follows the right option.
    for (const x of data[0]!.details.slice(0, 2)) {
      const line = x.asked.split('\n').find((l) => l.startsWith(`   - ${x.expected})`));
      t.equal(line, `   - ${x.expected}) Black`);
    }
    const again = await reward(body);
    t.same(again.body.data, r.body.data, 'the same seed gives the same answers and rewards');
    // (Other seeds give other shuffles: planAsks, unit-tested.)
    const shared = await reward({ captions: ['one', 'two'], questions: [Q1, Q2], questions_per_caption: 2, max_tokens: 2 });
    t.equal(shared.status, 200);
    t.same((shared.body.data as { total: number }[]).map((d) => d.total), [2, 2], 'questions_per_caption draws');
    t.notOk('details' in (shared.body.data as object[])[0]!);
  });

  t.test('/get_reward: CapRL\'s reward-server shape', async (t) => {
    const q = `${Q1.question}\n   - E) Can not answer based on the caption`;
    const body = { prompts: [['A black dog.', [[q, 'C'], [Q1.question, 'A']]], ['Nothing here.', [[q, 'E']]]], shuffle_qa: true, seed: 3, temperature: 0 };
    const r = await reward(body, '/get_reward');
    t.equal(r.status, 200, JSON.stringify(r.body));
    const rewards = r.body.rewards as number[];
    t.equal(rewards.length, 2);
    t.same(r.body.qa_rewards, rewards);
    t.ok(rewards.every((x) => x >= 0 && x <= 1));
    t.ok([0, 0.5, 1].includes(rewards[0]!) && [0, 1].includes(rewards[1]!), 'fractions of 2 and 1 answers');
    t.same((await reward(body, '/get_reward')).body, r.body, 'deterministic under the seed');
    const drawn = await reward({ prompts: [body.prompts[1]], qa_num: 4, max_tokens: 2 }, '/get_reward');
    t.ok((drawn.body.rewards as number[]).every((x) => [0, 0.25, 0.5, 0.75, 1].includes(x)), 'qa_num=4: quarters');
  });

  t.test('reward validation', async (t) => {
    const cases: [unknown, string | null, string?][] = [
      [{}, 'items'],
      [{ items: [] }, 'items'],
      [{ items: [{ caption: 1, questions: [Q1] }] }, 'items[0].caption'],
      [{ items: [{ caption: 'x', questions: [] }] }, 'items[0].questions'],
      [{ items: [{ caption: 'x', questions: [{ ...Q1, answer: 'Z' }] }] }, 'items[0].questions[0].answer'],
      [{ items: [{ caption: 'x', questions: [{ question: 'no options', answer: 'A' }] }] }, 'items[0].questions[0].question'],
      [{ captions: ['x'], questions: [Q1], samples_per_question: 0 }, 'samples_per_question'],
      [{ captions: ['x'], questions: [Q1], temperature: -2 }, 'temperature'],
      [{ captions: ['x'], questions: [Q1], shuffle_options: 'yes' }, 'shuffle_options'],
      [{ captions: ['x'], questions: [Q1], model: 'other' }, 'model', '/v1/rewards/caprl'],
      [{ prompts: [['x', []]] }, 'prompts[0]', '/get_reward'],
      [{ prompts: [['x', [['no options', 'A']]]] }, 'prompts[0][1][0].question', '/get_reward'],
    ];
    for (const [body, param, path] of cases) {
      const r = await reward(body, path ?? '/v1/rewards/caprl');
      t.equal(r.status, param === 'model' ? 404 : 400, JSON.stringify(body));
      t.equal((r.body as unknown as ErrorBody).error.param, param, JSON.stringify(body));
    }
    const huge = await reward({ captions: Array(300).fill('x'), questions: [Q1], questions_per_caption: 1000 });
    t.equal(huge.status, 400);
    t.match(huge.body, { error: { message: /at most 65536/ } });
  });
});

t.test('--api-key covers the workflow routes, /get_reward included', async (t) => {
  const s = await startTestServer({ engine: { nThreads: 1, maxSeqs: 2, maxModelLen: 2048 }, server: { apiKeys: ['sekret'] } });
  t.teardown(() => s.close());
  const body = JSON.stringify({ prompts: [['A cat.', [['Is there a cat?\nA) yes\nB) no', 'A']]]], temperature: 0, max_tokens: 2 });
  const post = (path: string, key?: string) => fetch(`${s.url}${path}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...(key ? { authorization: `Bearer ${key}` } : {}) },
    body,
  });
  for (const path of ['/get_reward', '/v1/rewards/caprl', '/v1/captions']) {
    const r = await post(path);
    t.equal(r.status, 401, `${path} without the key`);
    t.match(await r.json(), { error: { code: 'invalid_api_key' } });
    t.equal((await post(path, 'wrong')).status, 401, `${path} with a wrong key`);
  }
  const ok = await post('/get_reward', 'sekret');
  t.equal(ok.status, 200);
  t.equal(((await ok.json()) as { rewards: number[] }).rewards.length, 1);
});

