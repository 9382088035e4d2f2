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

// --max-num-batched-tokens 64: a 256-token image goes into the KV cache over four steps of one
// ubatch each, and the caption still equals llama.cpp's with the same batch (-b 64 -ub 64), which
// decodes the image in one call of four ubatches.
t.test('an image decoded over several steps equals llama-mtmd-cli -b 64', { skip: existsSync(cli) ? false : `${cli} not built` }, async (t) => {
  const server = await startTestServer({ engine: { nBatch: 64 } });
  t.teardown(() => server.close());
  const dir = mkdtempSync(path.join(os.tmpdir(), 'caprl-ref-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const n = 16;
  const uri = await pngDataUri(448, 448);
  const png = path.join(dir, 'img-448.png');
  writeFileSync(png, Buffer.from(uri.split(',')[1], 'base64'));
  const res = await server.client.chat.completions.create({
    model: 'caprl',
    messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: uri } }, { type: 'text', text: prompt }] }],
    temperature: 0,
    max_tokens: n,
  });
  const ours = res.choices[0].message.content!.trimStart();
  t.ok(res.usage!.prompt_tokens > 256, `${res.usage!.prompt_tokens} prompt tokens, 256 of them the image's`);
  // stepTokens[k] counts steps of 2^(k-1) < tokens <= 2^k: none above 64.
  const steps = server.engine.stats().stepTokens;
  t.equal(steps.slice(7).reduce((a, b) => a + b, 0), 0, 'no step took more than 64 tokens');
  t.ok(steps[6]! >= 4, 'the image took at least four full steps');

  const ref = await runToolUntil(cli, [
    '-m', server.model, '--mmproj', server.mmproj, '--image', png, '-p', prompt,
    '-n', String(n + 8), '--temp', '0', '-t', '2', '--jinja', '-b', '64', '-ub', '64',
  ], (r) => r.stdout.trimStart().length > ours.length);
  t.equal(ref.stdout.trimStart().slice(0, ours.length), ours, 'same greedy text as llama-mtmd-cli with the same batch');
});
