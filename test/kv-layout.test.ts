// The KV cache's layout: a stream per sequence when the cache holds every sequence at
// --max-model-len (attention then reads only a sequence's own cells), one shared pool otherwise.
// Decoding must not depend on it: batching, n choices (copied across streams) and images.
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import t, { type Test } from 'tap';
import { Engine, type EngineImage } from '../src/engine/engine.js';
import { greedy } from './helpers/engine-inputs.js';
import { tinyModel } from './helpers/models.js';

async function run(engine: Engine, prompt: string, n: number, maxTokens: number, images: EngineImage[] = []): Promise<number[][]> {
  const out: number[][] = Array.from({ length: n }, () => []);
  for await (const ev of engine.generate({ prompt, images, n, sampling: greedy(maxTokens) })) out[ev.index]!.push(...ev.tokens);
  return out;
}

const prompt = (i: number): string => `<|im_start|>user\nsequence ${i}: ${'words '.repeat(i * 3)}<|im_end|>\n<|im_start|>assistant\n`;

t.test('the layout follows the size', async (t) => {
  const { model } = await tinyModel();
  for (const [nCtx, layout] of [[2048, 'per-sequence'], [1536, 'unified']] as const) {
    const engine = new Engine({ model, nCtx, maxModelLen: 512, maxSeqs: 4, nBatch: 512, nThreads: 1, logLevel: 'error' });
    t.equal(engine.info.kvCache.layout, layout, `${nCtx} cells for 4 x 512`);
    await engine.close();
  }
  const noLimit = new Engine({ model, nCtx: 4096, maxSeqs: 4, nBatch: 512, nThreads: 1, logLevel: 'error' });
  t.equal(noLimit.info.kvCache.layout, 'unified', 'no --max-model-len: one pool');
  t.equal(noLimit.info.imagePromptRows, false, 'no mmproj: no image prompts');
  await noLimit.close();
});

t.test('a stream per sequence: batching, n choices, full length and images', async (t) => {
  const { model, mmproj } = await tinyModel();
  const engine = new Engine({ model, mmproj, nCtx: 4 * 512, maxModelLen: 512, maxSeqs: 4, nBatch: 512, nThreads: 1, logLevel: 'error' });
  t.teardown(() => engine.close());
  t.equal(engine.info.kvCache.layout, 'per-sequence');
  t.equal(engine.info.imagePromptRows, true, 'image prompts go in as embedding rows (the token table is readable)');

  const solo: number[][] = [];
  for (let i = 0; i < 4; i++) solo.push((await run(engine, prompt(i), 1, 24))[0]!);
  const together = await Promise.all([0, 1, 2, 3].map(async (i) => (await run(engine, prompt(i), 1, 24))[0]!));
  t.same(together, solo, '4 sequences decoded together: the tokens each gets alone');

  const choices = await run(engine, prompt(1), 3, 24);
  t.same(choices, [solo[1], solo[1], solo[1]], 'n = 3 greedy choices (prompt copied to two more streams) equal n = 1');

  const promptTokens = engine.tokenize(prompt(0), true, true).length;
  const long = (await run(engine, prompt(0), 1, 512 - promptTokens - 1))[0]!;
  t.equal(long.length, 512 - promptTokens - 1, 'a request up to --max-model-len fits its stream');

  const rgb = Buffer.alloc(224 * 224 * 3);
  for (let i = 0; i < rgb.length; i++) rgb[i] = (i * 37) % 251;
  const image = { width: 224, height: 224, rgb };
  const withImage = `<|im_start|>user\n<|vision_start|>${engine.info.mediaMarker}<|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n`;
  const one = await run(engine, withImage, 1, 12, [image]);
  const two = await run(engine, withImage, 2, 12, [image]);
  t.same(two, [one[0], one[0]], 'an image request: its choices equal n = 1');
});

t.test('shared pool: n choices that cannot all reach max_tokens stop at their share, others unaffected', async (t) => {
  const { model } = await tinyModel();
  const engine = new Engine({ model, nCtx: 1024, maxSeqs: 4, nBatch: 512, nThreads: 1, logLevel: 'error' });
  t.teardown(() => engine.close());
  t.equal(engine.info.kvCache.layout, 'unified');
  const other = prompt(2);
  const alone = (await run(engine, other, 1, 40))[0]!;

  const promptTokens = engine.tokenize(prompt(1), true, true).length;
  const finishes: string[] = [];
  const lengths = [0, 0, 0];
  const big = (async () => {
    for await (const ev of engine.generate({ prompt: prompt(1), images: [], n: 3, sampling: greedy(600) })) {
      lengths[ev.index]! += ev.tokens.length;
      if (ev.finish) finishes.push(ev.finish.reason);
    }
  })();
  const beside = run(engine, other, 1, 40);
  const [, besideTokens] = await Promise.all([big, beside]);
  t.same(finishes, ['length', 'length', 'length'], '3 x 600 tokens do not fit 1024 cells: every choice ends at its limit');
  const share = Math.floor((1024 - promptTokens) / 3);
  t.same(lengths, [share, share, share], `each choice got its share of the pool (${share} tokens)`);
  t.same(besideTokens[0], alone, 'a request beside it is not failed and gets its own tokens');

  const huge = engine.generate({ prompt: prompt(1), images: [], n: 4, sampling: greedy(10) });
  const reasons: string[] = [];
  for await (const ev of huge) if (ev.finish) reasons.push(ev.finish.reason);
  t.same(reasons, ['length', 'length', 'length', 'length'], 'n = 4 x 10 tokens fits: each choice runs to max_tokens');
});

t.test('a stream per sequence, sampled on 3 threads, sequence ids reused out of order: the tokens each gets alone', async (t) => {
  const { model } = await tinyModel();
  const engine = new Engine({ model, nCtx: 4 * 512, maxModelLen: 512, maxSeqs: 4, nBatch: 512, nThreads: 2, nSamplingThreads: 3, logLevel: 'error' });
  t.teardown(() => engine.close());
  t.equal(engine.info.kvCache.layout, 'per-sequence');
  const solo: number[][] = [];
  for (let i = 0; i < 4; i++) solo.push((await run(engine, prompt(i), 1, 24))[0]!);
  const lengths = [30, 5, 20, 10];
  const soloStaggered: number[][] = [];
  for (let i = 0; i < 4; i++) soloStaggered.push((await run(engine, prompt(4 + i), 1, lengths[i]! + 8))[0]!);
  for (let round = 0; round < 8; round++) {
    // Different lengths end the sequences in another order than they started, so the next
    // requests get their sequence ids (and streams) out of order: llama.cpp then reorders the
    // step's outputs, lazily, on the first read of the logits. The survivors move down into the
    // holes (their streams copied) while they decode.
    const staggered = await Promise.all(lengths.map(async (n, i) => (await run(engine, prompt(4 + i), 1, n + round))[0]!));
    t.same(staggered, soloStaggered.map((s, i) => s.slice(0, lengths[i]! + round)), `round ${round}: sequences that ended early or moved get the tokens each gets alone`);
    const together = await Promise.all([0, 1, 2, 3].map(async (i) => (await run(engine, prompt(i), 1, 24))[0]!));
    t.same(together, solo, `round ${round}: 4 sequences on reused streams get the tokens each gets alone`);
  }
});

/** Runs helpers/ubatch-child.js with llama.cpp's batch debug output on; its stdout as JSON and
 * the ubatches it logged between its markers. */
async function ubatchChild(t: Test, args: string[]): Promise<{ out: Record<string, unknown>; ubatches: { tokens: number; seqTokens: number; seqs: number }[] }> {
  const script = fileURLToPath(new URL('./helpers/ubatch-child.js', import.meta.url));
  const child = spawn(process.execPath, [script, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, LLAMA_BATCH_DEBUG: '1' } });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d) => (stdout += d));
  child.stderr.on('data', (d) => (stderr += d));
  const code = await new Promise<number | null>((r) => child.on('close', r));
  t.equal(code, 0, stderr.slice(-2000));
  const phase = stderr.slice(stderr.indexOf('\nBEGIN\n'), stderr.indexOf('\nEND\n'));
  // Each ubatch: "added ubatch to split:" then its n_tokens, n_seq_tokens, n_seqs lines.
  const ubatches = phase.split('added ubatch to split').slice(1).map((block) => {
    const num = (name: string) => Number(new RegExp(`${name}\\s*=\\s*(\\d+)`).exec(block)?.[1] ?? NaN);
    return { tokens: num('n_tokens'), seqTokens: num('n_seq_tokens'), seqs: num('n_seqs') };
  });
  return { out: JSON.parse(stdout) as Record<string, unknown>, ubatches };
}

t.test('a stream per sequence: sequences decoding together are one ubatch, holes in the ids or not', async (t) => {
  // llama.cpp cuts a batch for per-sequence streams into ubatches of consecutive sequence ids, each
  // a pass over the weights. Read from its own batch debug output, in a child process.
  const { model } = await tinyModel();
  const { out, ubatches } = await ubatchChild(t, ['text', model]);
  t.equal(out.layout, 'per-sequence');
  t.equal(out.moves, 2, 'one stream copied each time: the last survivor, into the first hole');
  const alone = out.alone as number[][];
  t.same(out.together, [...alone, ...alone], 'the long requests (one moved to a lower id when the others ended) get their tokens alone');
  t.ok(ubatches.length >= 30, `${ubatches.length} ubatches read from llama.cpp's debug output`);
  t.same(ubatches.filter((u) => u.seqs < 2).map((u) => u.seqs), [], 'no ubatch holds a single sequence: 4, then 2 decoding, one pass each step');
});

t.test('a stream per sequence: an image prompt is one prefill pass, its text included', async (t) => {
  // Its text before and after the image would otherwise be ubatches of their own (a ubatch takes
  // as many tokens from each of its sequences).
  const { model, mmproj } = await tinyModel();
  const { out, ubatches } = await ubatchChild(t, ['image', model, mmproj]);
  t.equal(out.layout, 'per-sequence');
  const prompt = out.promptTokens as number;
  t.ok(prompt > 64, `${prompt} prompt tokens, 64 of them the image's`);
  t.same(ubatches.filter((u) => u.seqTokens > 1).map((u) => u.tokens), [prompt - 1], 'one ubatch of every prompt row but the last');
  t.equal(ubatches.length, 5, `then the last prompt token, then the first three tokens drawn, one a step: ${JSON.stringify(ubatches)}`);
});
