// The engine decodes an image prompt's text as token-embedding rows it reads from the model file
// itself (native/token-embeddings.cpp). Those rows must be the ones llama.cpp's get_rows gives for
// the same tokens, bit for bit, in every weight type the generator writes: checked against ggml's
// get_rows by build/bin/caprl-token-embd-check, and end to end by test/reference.test.ts (f16).
import t from 'tap';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { llamaBinDir } from '../src/engine/native.js';
import { tinyModel, tinyModelOf } from './helpers/models.js';

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
