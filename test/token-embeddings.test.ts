// The engine decodes an image prompt's text as token-embedding rows it reads from the model file
// itself (native/token-embeddings.cpp). Those rows must be the ones llama.cpp's get_rows gives for
// the same tokens, bit for bit, in every weight type the generator writes: checked against ggml's
// get_rows by build/bin/caprl-token-embd-check, and end to end by test/reference.test.ts (f16).
// A model split over several GGUF files (llama.cpp's <prefix>-0000i-of-0000N.gguf) may hold the
// table in any of them.
import t from 'tap';
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { Engine } from '../src/engine/engine.js';
import { llamaBinDir } from '../src/engine/native.js';
import { greedy, patternImage } from './helpers/engine-inputs.js';
import { tinyModel, tinyModelOf } from './helpers/models.js';
import { splitGGUF } from './helpers/split-gguf.js';

const run = promisify(execFile);

t.test('token-embedding rows equal ggml get_rows (f16, bf16, q8_0)', async (t) => {
  const bin = path.join(llamaBinDir(), 'caprl-token-embd-check');
  t.ok(existsSync(bin), `${bin} is built with the addon`);
  const models = [(await tinyModel()).model, (await tinyModelOf('bf16')).model, (await tinyModelOf('q8_0')).model];
  for (const model of models) {
    const { stdout } = await run(bin, [model]).catch((err: { stdout?: string; stderr?: string; code?: number }) => {
      t.fail(`caprl-token-embd-check exited ${err.code}: ${err.stderr ?? ''}`);
      return { stdout: err.stdout ?? '' };
    });
    t.match(stdout, /equal to ggml get_rows; token \d+ refused/, stdout.trim());
  }
});

t.test('a split model: the table is read from the split file that holds it', async (t) => {
  const { model, mmproj } = await tinyModel();
  const dir = mkdtempSync(path.join(os.tmpdir(), 'caprl-split-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  // The token table alone in the second file: the first, which the loader is given, lacks it.
  const first = await splitGGUF(model, dir, 'tiny', (name) => name === 'token_embd.weight');

  const caption = async (m: string): Promise<{ rows: boolean; tokens: number[] }> => {
    const engine = new Engine({ model: m, mmproj, nCtx: 2048, maxModelLen: 1024, maxSeqs: 2, nBatch: 512, nThreads: 1, logLevel: 'error' });
    try {
      const tokens: number[] = [];
      const prompt = `<|im_start|>user\n<|vision_start|>${engine.info.mediaMarker}<|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n`;
      for await (const ev of engine.generate({ prompt, images: [patternImage(224, 5)], n: 1, sampling: greedy(16) })) tokens.push(...ev.tokens);
      return { rows: engine.info.imagePromptRows, tokens };
    } finally {
      await engine.close();
    }
  };
  const whole = await caption(model);
  const split = await caption(first);
  t.equal(split.rows, true, 'image prompts go in as embedding rows: the table was found in the second file');
  t.equal(split.tokens.length, 16);
  t.same(split.tokens, whole.tokens, 'the same greedy caption as the single-file model');

});
