// Greedy output through the whole stack (openai client → HTTP → sharp → chat template → engine)
// equals llama.cpp's own reference, llama-mtmd-cli built from the same source, on the same
// model, image and prompt. This catches a wrong template, image path, positions or sampler.
import t from 'tap';
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { llamaBinDir } from '../src/engine/native.js';
import { pngDataUri, startTestServer } from './helpers/server.js';

const run = promisify(execFile);
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

    const ref = await run(cli, [
      '-m', server.model, '--mmproj', server.mmproj, '--image', png, '-p', prompt,
      '-n', String(n), '--temp', '0', '-t', '2', '--jinja',
    ], { encoding: 'buffer', maxBuffer: 1 << 20 });
    const expected = ref.stdout.toString('utf8').trim();
    t.ok(expected.length > 0, `reference produced text for ${w}x${h}`);

    const res = await server.client.chat.completions.create({
      model: 'caprl',
      messages: [{ role: 'user', content: [
        { type: 'image_url', image_url: { url: uri } },
        { type: 'text', text: prompt },
      ] }],
      temperature: 0,
      max_tokens: n,
    });
    t.equal(res.choices[0].message.content?.trim(), expected, `${w}x${h}: same greedy text as llama-mtmd-cli`);
  }
});
