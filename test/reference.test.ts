// Greedy output through the whole stack (openai client → HTTP → sharp → chat template → engine)
// equals llama.cpp's own reference, llama-mtmd-cli built from the same source, on the same
// model, image and prompt. This catches a wrong template, image path, positions or sampler.
import t from 'tap';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { llamaBinDir } from '../src/engine/native.js';
import { runToolUntil } from './helpers/llama-tools.js';
import { pngDataUri, startTestServer } from './helpers/server.js';

const cli = path.join(llamaBinDir(), 'llama-mtmd-cli');
const prompt = 'Please describe this image in detail';

t.test('greedy caption equals llama-mtmd-cli', { skip: existsSync(cli) ? false : `${cli} not built` }, async (t) => {
  const server = await startTestServer();
  t.teardown(() => server.close());
  const dir = mkdtempSync(path.join(os.tmpdir(), 'caprl-ref-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));

  // Sizes already on Qwen's 28-pixel grid, so neither side resizes; one that is not,
  // so the server's resize must land where llama.cpp's would.
  for (const [w, h, n] of [[224, 224, 24], [336, 196, 16]] as const) {
    const uri = await pngDataUri(w, h);
    const png = path.join(dir, `img-${w}x${h}.png`);
    writeFileSync(png, Buffer.from(uri.split(',')[1], 'base64'));

    const res = await server.client.chat.completions.create({
      model: 'caprl',
      messages: [{ role: 'user', content: [
        { type: 'image_url', image_url: { url: uri } },
        { type: 'text', text: prompt },
      ] }],
      temperature: 0,
      max_tokens: n,
    });
    const ours = res.choices[0].message.content!.trimStart();
    t.equal(res.usage?.completion_tokens, n);

    // The reference generates 8 tokens more than we compare: the end of its output can be lost
    // at exit (see helpers/llama-tools.ts), and a cut run is repeated.
    const ref = await runToolUntil(cli, [
      '-m', server.model, '--mmproj', server.mmproj, '--image', png, '-p', prompt,
      '-n', String(n + 8), '--temp', '0', '-t', '2', '--jinja',
    ], (r) => r.stdout.trimStart().length > ours.length);
    const expected = ref.stdout.trimStart();
    t.ok(expected.length > ours.length, `reference produced enough text for ${w}x${h}`);
    // Greedy decoding: our n tokens are the first n of the reference's n + 8.
    t.equal(expected.slice(0, ours.length), ours, `${w}x${h}: same greedy text as llama-mtmd-cli`);
  }
});

// --max-num-batched-tokens 64: an image prompt (256 image rows, its text as token embeddings) goes
// into the KV cache over several steps of one 64-row ubatch each. The caption equals the one from
// the whole prompt in one step cut into the same ubatches (nBatch 512, nUbatch 64): chunking over
// steps changes nothing. (llama-mtmd-cli cannot serve as the reference here: it decodes the
// prompt's text and its image in separate calls, so its ubatches are cut elsewhere; the default
// batch above, one ubatch either way, matches it.)
t.test('an image prompt decoded over several steps equals it in one step, same ubatches', async (t) => {
  const chunked = await startTestServer({ engine: { nBatch: 64 } });
  t.teardown(() => chunked.close());
  const whole = await startTestServer({ engine: { nBatch: 512, nUbatch: 64 } });
  t.teardown(() => whole.close());
  const uri = await pngDataUri(448, 448);
  const caption = async (server: typeof whole) => {
    const res = await server.client.chat.completions.create({
      model: 'caprl',
      messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: uri } }, { type: 'text', text: prompt }] }],
      temperature: 0,
      max_tokens: 16,
    });
    t.ok(res.usage!.prompt_tokens > 256, `${res.usage!.prompt_tokens} prompt tokens, 256 of them the image's`);
    return res.choices[0].message.content!;
  };
  const [a, b] = [await caption(chunked), await caption(whole)];
  // stepTokens[k] counts steps of 2^(k-1) < tokens <= 2^k: none above 64 in the chunked run.
  const steps = chunked.engine.stats().stepTokens;
  t.equal(steps.slice(7).reduce((x, y) => x + y, 0), 0, 'chunked: no step took more than 64 tokens');
  t.ok(steps[6]! >= 4, 'chunked: the prompt took at least four full steps');
  t.ok(whole.engine.stats().stepTokens.slice(7).reduce((x, y) => x + y, 0) >= 1, 'whole: the prompt went in one step');
  t.equal(a, b, 'same greedy text');
});
