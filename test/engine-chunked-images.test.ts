// Images that go into the KV cache over several steps (--max-num-batched-tokens 64; a 448x448
// image is 256 embedding rows on the tiny model) meeting preemption, n choices, cancellation and
// the tokens-per-step counters. Every assertion holds by construction (greedy tokens equal a run
// alone, every request finishes with a reason, counts add up); none depends on speed.
import t from 'tap';
import { Engine, type EngineEvent, type EngineImage, type EngineOptions } from '../src/engine/engine.js';
import { greedy, patternImage as image } from './helpers/engine-inputs.js';
import { tinyModel } from './helpers/models.js';

type Finish = NonNullable<EngineEvent['finish']>;

interface Job {
  text: string;
  images?: EngineImage[];
  n?: number;
  maxTokens: number;
}

interface Ran {
  tokens: number[][];
  finishes: Finish[];
}

function prompt(engine: Engine, job: Job): string {
  const marker = (job.images ?? []).map(() => `<|vision_start|>${engine.info.mediaMarker}<|vision_end|>`).join('');
  return `<|im_start|>user\n${marker}${job.text}<|im_end|>\n<|im_start|>assistant\n`;
}

/** Runs a request to its end; `cancel` (if given) receives its cancel function at once. */
async function run(engine: Engine, job: Job, hooks: { cancel?: (fn: () => void) => void; onEvent?: () => void } = {}): Promise<Ran> {
  const n = job.n ?? 1;
  const gen = engine.generate({ prompt: prompt(engine, job), images: job.images ?? [], n, sampling: greedy(job.maxTokens) });
  hooks.cancel?.(() => gen.cancel());
  const out: Ran = { tokens: Array.from({ length: n }, () => []), finishes: [] };
  for await (const ev of gen) {
    out.tokens[ev.index]!.push(...ev.tokens);
    if (ev.finish) out.finishes[ev.index] = ev.finish;
    hooks.onEvent?.();
  }
  return out;
}

const options = async (over: Partial<EngineOptions>): Promise<EngineOptions> => {
  const { model, mmproj } = await tinyModel();
  return { model, mmproj, maxSeqs: 4, nBatch: 64, nThreads: 1, logLevel: 'error', ...over };
};

// An image request (about 265 prompt cells, 256 of them image rows decoded 64 per step) and,
// from its first token on, an n = 2 text request that reserves its prompt and both outputs (~420 cells) in a
// 768-cell pool: the image request, the only sequence that may be preempted, outgrows what is
// left after ~80 tokens, gives its cells back, and later prefills its prompt, image included,
// and its output again (the image from the cache, or encoded again with the cache off). Tokens
// are not compared with a run alone (a prompt prefilled in other pieces may round differently):
// what holds is that every choice gets all its tokens and ends.
const texts: Job[] = [0, 1, 2].map((i) => ({ text: `story ${i}: ${'once upon a time '.repeat(i + 1)}`, maxTokens: 150 }));
const pictures: Job[] = [
  { text: 'Describe this image.', images: [image(448, 7)], maxTokens: 120 },
  { text: 'And this one, briefly.', images: [image(448, 13)], maxTokens: 24 },
];

for (const imageCacheBytes of [256 << 20, 0]) {
  t.test(`an image request preempted and resumed, cache ${imageCacheBytes ? 'on' : 'off'}: every choice still gets all its tokens`, async (t) => {
    const engine = new Engine(await options({ nCtx: 768, imageCacheBytes }));
    t.teardown(() => engine.close());
    t.equal(engine.info.kvCache.layout, 'unified');
    const pinned: Job = { ...texts[0]!, n: 2, maxTokens: 200 };
    const alone = await run(engine, pictures[0]!);
    const before = engine.stats();
    // The text request comes once the image request has its image in (its first token), so that
    // it is admitted long before the image request has the ~50 tokens that would keep it out.
    let firstEvent!: () => void;
    const started = new Promise<void>((r) => (firstEvent = r));
    const pictureRun = run(engine, pictures[0]!, { onEvent: () => firstEvent() });
    await started;
    const [picture, text] = await Promise.all([pictureRun, run(engine, pinned)]);
    const after = engine.stats();
    t.ok(after.preemptions > before.preemptions, `${after.preemptions - before.preemptions} preemptions`);
    t.same(picture!.finishes.map((f) => [f.reason, f.completionTokens, f.promptTokens]), [['length', 120, alone.finishes[0]!.promptTokens]]);
    t.equal(picture!.tokens[0]!.length, 120, 'every token of the preempted request, none lost or repeated');
    t.same(text!.finishes.map((f) => [f.reason, f.completionTokens]), [['length', 200], ['length', 200]]);
    t.same(text!.tokens.map((c) => c.length), [200, 200]);
    if (imageCacheBytes) {
      t.equal(after.imageCacheMisses, before.imageCacheMisses, 'encoded once, in the run alone');
      t.ok(after.imageCacheHits - before.imageCacheHits >= 2, 'admission and resumption took it from the cache');
    }
    t.equal(after.kvUsedCells, 0);
    t.equal(after.running, 0);
    t.equal(after.waiting, 0);
  });
}

t.test('n = 3 beside text in one shared pool: a multi-step image prefilled once, choices equal n = 1', async (t) => {
  const engine = new Engine(await options({ nCtx: 2048 }));
  t.teardown(() => engine.close());
  t.equal(engine.info.kvCache.layout, 'unified');
  const job = { ...pictures[0]!, maxTokens: 16 };
  const one = await run(engine, job);
  const text = await run(engine, texts[1]!);
  const [three, textAgain] = await Promise.all([run(engine, { ...job, n: 3 }), run(engine, texts[1]!)]);
  t.same(three!.tokens, [one.tokens[0], one.tokens[0], one.tokens[0]]);
  t.same(three!.finishes.map((f) => f.reason), ['length', 'length', 'length']);
  t.same(three!.finishes.map((f) => f.promptTokens), [0, 1, 2].map(() => one.finishes[0]!.promptTokens));
  t.same(textAgain!.tokens, text.tokens, 'the text request beside it is unchanged');
  t.equal(engine.stats().kvUsedCells, 0);
});

t.test('cancelled at any point of a multi-step image: abort, cells freed, the next run unchanged', async (t) => {
  const engine = new Engine(await options({ nCtx: 2048 }));
  t.teardown(() => engine.close());
  const job = pictures[1]!;
  const reference = await run(engine, job);
  // A text request beside it paces the cancels: after its k-th event, for several k, the image
  // request is cancelled (before, during or after its image rows; where exactly is not asserted).
  for (const k of [0, 1, 2, 3, 5, 8]) {
    let cancelImage = (): void => {};
    const image = run(engine, job, { cancel: (fn) => (cancelImage = fn) });
    let events = 0;
    const pacer = run(engine, texts[0]!, {
      onEvent: () => {
        if (events++ === k) cancelImage();
      },
    });
    const [ri, rp] = await Promise.all([image, pacer]);
    t.ok(['abort', 'length'].includes(ri.finishes[0]!.reason), `k = ${k}: the image request ended (${ri.finishes[0]!.reason})`);
    t.equal(rp.finishes[0]!.reason, 'length');
  }
  const s = engine.stats();
  t.equal(s.kvUsedCells, 0, 'every cell freed');
  t.equal(s.running, 0);
  t.same((await run(engine, job)).tokens, reference.tokens, 'the same tokens after the cancels');
});

t.test('tokens per step with multi-step images: the sum is every prompt and decoded token once', async (t) => {
  const engine = new Engine(await options({ nCtx: 2048 }));
  t.teardown(() => engine.close());
  const before = engine.stats();
  const jobs = [pictures[0]!, texts[0]!, pictures[1]!, { ...texts[1]!, maxTokens: 20 }];
  const runs = await Promise.all(jobs.map((job) => run(engine, job)));
  const after = engine.stats();
  t.equal(after.preemptions, before.preemptions, 'no preemption with this much room');
  const prompts = runs.reduce((s, r) => s + r.finishes[0]!.promptTokens, 0);
  const decoded = runs.reduce((s, r) => s + r.finishes[0]!.completionTokens - 1, 0);
  t.equal(after.stepTokensSum - before.stepTokensSum, prompts + decoded, 'image rows, prompt text and decoded tokens, each once');
  // A step is at most the 64-token budget, or one ubatch of image rows beside at most 4 decoding
  // sequences: nothing above 128 (buckets k >= 8).
  t.equal(after.stepTokens.slice(8).reduce((a, b) => a + b, 0), 0, 'no step above 128 tokens');
});

// A 1036x1036 image (1369 rows) going in 8 rows a step beside a text request that keeps growing,
// in a pool that holds both prompts but not the text's whole output: the pool fills before the
// image is in, so the image request, the youngest, is preempted in the middle of its image. It
// must then wait until it fits again (here: until the text request is done), not start over at
// once and fill the pool again (it did: it was preempted twice in this run before the fix).
t.test('preempted in the middle of its image: waits for room, prefills it once more, every token', async (t) => {
  const engine = new Engine(await options({ nCtx: 1536, nBatch: 8, maxSeqs: 2, visionEncoder: 'caprl' }));
  t.teardown(() => engine.close());
  t.equal(engine.info.kvCache.layout, 'unified');
  const big: Job = { text: 'Describe this image.', images: [image(1036, 5)], maxTokens: 8 };
  const story: Job = { text: 'Tell me a long story about a cat.', maxTokens: 400 };
  const alone = await run(engine, big);  // also puts the image in the embedding cache
  const before = engine.stats();
  const [text, picture] = await Promise.all([run(engine, story), run(engine, big)]);
  const after = engine.stats();
  t.equal(after.preemptions - before.preemptions, 1, 'preempted once');
  t.same(text.finishes.map((f) => [f.reason, f.completionTokens]), [['length', 400]]);
  t.same(picture.finishes.map((f) => [f.reason, f.completionTokens]), [['length', 8]]);
  t.same(picture.tokens, alone.tokens, 'prefilled again alone, its greedy tokens are the ones of a run alone');
  // Cells decoded and then given back: the preempted request's prompt prefix and image rows.
  const once = [text, picture].reduce((s, r) => s + r.finishes[0]!.promptTokens + r.finishes[0]!.completionTokens - 1, 0);
  const lost = after.stepTokensSum - before.stepTokensSum - once;
  const prefix = engine.tokenize('<|im_start|>user\n<|vision_start|>').length;
  t.ok(lost > prefix && lost < prefix + 1369, `preempted mid-image: ${lost - prefix} of its 1369 image rows were in`);
  t.equal(after.imageCacheHits - before.imageCacheHits, 2, 'the image came from the cache at admission and at the restart');
  t.equal(after.kvUsedCells, 0);
});
