// native/sampler.cpp: its direct path draws from the distribution llama.cpp's chain draws from
// (build/bin/caprl-sampler-check: both against an oracle written from the filters' definitions),
// and the engine's tokens do not depend on how many threads draw them.
import t from 'tap';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { Engine, type SamplingParams } from '../src/engine/engine.js';
import { llamaBinDir } from '../src/engine/native.js';
import { greedy } from './helpers/engine-inputs.js';
import { tinyModel } from './helpers/models.js';

const run = promisify(execFile);

t.test('direct sampling vs llama.cpp chain vs the filters\' definition', async (t) => {
  const bin = path.join(llamaBinDir(), 'caprl-sampler-check');
  t.ok(existsSync(bin), `${bin} is built with the addon`);
  const { stdout } = await run(bin, ['check'], { maxBuffer: 1 << 20 }).catch((err: { stdout?: string; code?: number }) => {
    t.fail(`caprl-sampler-check exited ${err.code}`);
    return { stdout: err.stdout ?? '' };
  });
  const lines = stdout.split('\n').filter((l) => /^(ok|FAIL) /.test(l));
  t.ok(lines.length >= 19, `${lines.length} cases`);
  for (const line of lines) t.ok(line.startsWith('ok '), line);
  t.match(stdout, /\b0 failed\n/);
});

const sampling = (over: Partial<SamplingParams>): SamplingParams => greedy(12, over);

/**
 * Tokens of every choice, one request of 6 choices at a time: its choices are decoded and drawn
 * together, and the batches do not depend on when requests arrive.
 */
async function tokensOf(nSamplingThreads: number): Promise<number[][]> {
  const { model } = await tinyModel();
  const engine = new Engine({ model, nCtx: 4096, maxSeqs: 6, nBatch: 512, nThreads: 1, nSamplingThreads, logLevel: 'error' });
  try {
    const settings: Partial<SamplingParams>[] = [
      {}, { temperature: 1, seed: 11 }, { temperature: 0.8, topP: 0.9, seed: 12 }, { temperature: 1.2, topK: 20, seed: 13 },
      { temperature: 0.7, minP: 0.05, seed: 14 }, { temperature: 1, seed: 15, minTokens: 4, ignoreEos: false },
    ];
    const out: number[][] = [];
    for (const [i, s] of settings.entries()) {
      const byChoice: number[][] = Array.from({ length: 6 }, () => []);
      const gen = engine.generate({ prompt: `<|im_start|>user\nrequest ${i}<|im_end|>\n<|im_start|>assistant\n`, images: [], n: 6, sampling: sampling(s) });
      for await (const ev of gen) byChoice[ev.index]!.push(...ev.tokens);
      out.push(...byChoice);
    }
    return out;
  } finally {
    await engine.close();
  }
}

t.test('the engine draws the same tokens on 1 or 3 sampling threads', async (t) => {
  const one = await tokensOf(1);
  const three = await tokensOf(3);
  t.equal(one.length, 36);
  t.ok(one.every((toks) => toks.length > 0));
  t.same(three, one, 'seeded and greedy choices are thread-count independent');
  t.notSame(one[6], one[7], 'the choices of a seeded request differ');
});
