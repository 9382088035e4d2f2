// What the engine thread reports for metrics, on the tiny model: each choice's finish carries its
// queue, prefill, decode and image-encode times, and Engine.stats() counts tokens per step. Every
// assertion holds by construction (order of events, one clock), none depends on speed.
import t from 'tap';
import { Engine, type EngineEvent, type EngineImage } from '../src/engine/engine.js';
import { greedy } from './helpers/engine-inputs.js';
import { tinyModel } from './helpers/models.js';

type Finish = NonNullable<EngineEvent['finish']>;

const sampling = greedy;

const prompt = (text: string, withImage = false, marker = '') =>
  `<|im_start|>user\n${withImage ? marker : ''}${text}<|im_end|>\n<|im_start|>assistant\n`;

interface Ran {
  finishes: Finish[];
  /** performance.now() just before generate() and when the last finish arrived, seconds. */
  startedAt: number;
  endedAt: number;
}

/** Starts a request; `firstToken` resolves at its first generated token, `done` with its finishes by choice. */
function start(engine: Engine, text: string, maxTokens: number, opts: { n?: number; images?: EngineImage[] } = {}) {
  const images = opts.images ?? [];
  const startedAt = performance.now() / 1000;
  const gen = engine.generate({ prompt: prompt(text, images.length > 0, engine.info.mediaMarker), images, sampling: sampling(maxTokens), n: opts.n });
  let firstToken!: () => void;
  const first = new Promise<void>((r) => (firstToken = r));
  const done = (async (): Promise<Ran> => {
    const finishes: Finish[] = [];
    for await (const ev of gen) {
      if (ev.tokens.length > 0) firstToken();
      if (ev.finish) finishes[ev.index] = ev.finish;
    }
    firstToken();
    return { finishes, startedAt, endedAt: performance.now() / 1000 };
  })();
  return { gen, first, done };
}

const engineTime = (f: Finish) => f.timings!.queued + (f.timings!.prefill ?? 0) + (f.timings!.decode ?? 0);

t.test('engine timings', async (t) => {
  const { model, mmproj } = await tinyModel();

  t.test('one sequence slot: a request queued behind another waits at least its whole run', async (t) => {
    const engine = new Engine({ model, mmproj, nCtx: 2048, maxSeqs: 1, nBatch: 512, nThreads: 1, logLevel: 'error' });
    t.teardown(() => engine.close());
    // C holds the only slot until cancelled, so A, B and D all arrive while it runs.
    const c = start(engine, 'Hold the slot', 1500);
    await c.first;
    const a = start(engine, 'First in line', 8);
    const b = start(engine, 'Second in line', 8);
    const d = start(engine, 'Cancelled while queued', 8);
    d.gen.cancel();
    c.gen.cancel();
    const [rc, ra, rb, rd] = await Promise.all([c.done, a.done, b.done, d.done]);
    const [fc, fa, fb, fd] = [rc.finishes[0]!, ra.finishes[0]!, rb.finishes[0]!, rd.finishes[0]!];

    t.equal(fd.reason, 'abort');
    t.equal(fd.timings, undefined, 'never admitted: no timings');
    t.equal(fc.reason, 'abort');
    t.ok(fc.timings?.prefill !== undefined && fc.timings.decode !== undefined, 'cancelled after its first token: prefill and decode');
    for (const f of [fa, fb]) {
      t.equal(f.reason, 'length');
      t.ok(f.timings!.prefill! > 0 && f.timings!.decode! > 0, 'prefill and decode measured');
      t.equal(f.timings!.imageEncode, undefined, 'no images, no encode time');
    }
    // B arrived before C was cancelled, A was admitted after that, and B only once A had finished.
    t.ok(fb.timings!.queued >= fa.timings!.prefill! + fa.timings!.decode!,
      `B queued ${fb.timings!.queued} s >= A's prefill + decode ${fa.timings!.prefill! + fa.timings!.decode!} s`);
    t.ok(fa.timings!.queued > 0, 'A waited for C');
    // The engine's intervals lie inside what JS saw from generate() to the finish (one monotonic clock).
    for (const r of [rc, ra, rb]) {
      t.ok(engineTime(r.finishes[0]!) <= r.endedAt - r.startedAt + 1e-6, 'queued + prefill + decode within generate() -> finish');
    }
  });

  t.test('tokens per step add up to the prompts and the decoded outputs; image encode on choice 0 only', async (t) => {
    const engine = new Engine({ model, mmproj, nCtx: 4096, maxSeqs: 4, nBatch: 512, nThreads: 1, logLevel: 'error' });
    t.teardown(() => engine.close());
    const W = 112, H = 84;
    const rgb = Buffer.alloc(W * H * 3);
    for (let i = 0; i < rgb.length; i++) rgb[i] = (i * 13) & 255;
    const before = engine.stats();
    const runs = await Promise.all([
      start(engine, 'Describe this image', 7, { n: 2, images: [{ width: W, height: H, rgb }] }).done,
      start(engine, 'Some text only', 9).done,
      start(engine, 'More text, longer prompt to prefill beside the others', 5).done,
    ]);
    const after = engine.stats();
    const [image, ...texts] = runs;

    t.ok(image!.finishes[0]!.timings!.imageEncode! > 0, 'a first-seen image takes encoder time');
    t.equal(image!.finishes[1]!.timings!.imageEncode, undefined, 'reported once per request, on choice 0');
    for (const r of texts) t.equal(r.finishes[0]!.timings!.imageEncode, undefined);

    // Each prompt (image rows included) is decoded once, and every sampled token but a choice's
    // last is decoded in a later step (no preemption with this much room).
    const finishes = runs.flatMap((r) => r.finishes);
    const prompts = runs.reduce((s, r) => s + r.finishes[0]!.promptTokens, 0);
    const decoded = finishes.reduce((s, f) => s + f.completionTokens - 1, 0);
    t.equal(after.preemptions, before.preemptions);
    t.equal(after.stepTokensSum - before.stepTokensSum, prompts + decoded, 'sum of tokens per step');
    const steps = (s: typeof after) => s.stepTokens.reduce((a, c) => a + c, 0);
    t.ok(steps(after) - steps(before) >= after.steps - before.steps, 'every decode step is counted');
    // Bucket k holds steps of 2^(k-1)+1 .. 2^k tokens (bucket 0: 1): the bounds of the sum they allow.
    const bound = (size: (k: number) => number) => after.stepTokens.reduce((a, c, k) => a + (c - before.stepTokens[k]!) * size(k), 0);
    const sum = after.stepTokensSum - before.stepTokensSum;
    t.ok(sum <= bound((k) => 2 ** k) && sum >= bound((k) => (k === 0 ? 1 : 2 ** (k - 1) + 1)), 'buckets agree with the sum');
  });
});
