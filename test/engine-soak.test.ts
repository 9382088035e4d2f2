// A seeded random workload against the engine in both KV layouts and with both vision encoders,
// the step's draws on 3 sampling threads: bursts and stragglers, images (multi-step at a 64-token
// budget, cached or not), n choices, log-probabilities, seeded sampling, bad prompts, and cancels
// at random points (before the first event, mid-prefill, mid-image, mid-decode). What must hold
// whatever the timing: every choice ends exactly once, with as many tokens as it reports, at
// max_tokens unless it was cancelled or refused; and afterwards no cell, sequence or request is
// left. CAPRL_SOAK_SEED=N reproduces a workload.
import t, { type Test } from 'tap';
import { Engine, type EngineEvent, type EngineImage, type EngineOptions, type SamplingParams } from '../src/engine/engine.js';
import { rng } from '../bench/load.js';
import { greedy, patternImage } from './helpers/engine-inputs.js';
import { tinyModel } from './helpers/models.js';

const SEED = Number(process.env.CAPRL_SOAK_SEED ?? Date.now() % 1_000_000);
const REQUESTS = Number(process.env.CAPRL_SOAK_REQUESTS ?? 60);

interface Job {
  prompt: string;
  images: EngineImage[];
  n: number;
  sampling: SamplingParams;
  /** Cancel after this many events (0: at once, before any); undefined: never. */
  cancelAfter?: number;
  /** A prompt the engine must refuse (image markers do not match the images). */
  bad: boolean;
}

interface Outcome {
  job: Job;
  tokens: number[][];
  logprobs: number[];
  finishes: (NonNullable<EngineEvent['finish']> | undefined)[];
  afterFinish: number;
}

function makeJob(r: () => number, marker: string, i: number): Job {
  const pick = (n: number): number => Math.floor(r() * n);
  const withImage = r() < 0.4;
  const images = withImage ? [patternImage(pick(2) === 0 ? 224 : 448, 3 + pick(4))] : [];
  const bad = r() < 0.05;
  const markers = (bad ? images.length + 1 : images.length);
  const media = Array.from({ length: markers }, () => `<|vision_start|>${marker}<|vision_end|>`).join('');
  const prompt = `<|im_start|>user\n${media}request ${i}: ${'tell me more '.repeat(pick(6))}<|im_end|>\n<|im_start|>assistant\n`;
  // Mostly short; some long enough to outgrow the shared pool's headroom (preemption).
  const sampling = greedy(r() < 0.3 ? 60 + pick(100) : 1 + pick(40));
  const style = pick(4);
  if (style === 1) Object.assign(sampling, { temperature: 0.8, topP: 0.9, seed: pick(1000) });
  if (style === 2) sampling.logprobs = pick(3);
  const n = r() < 0.15 ? 2 + pick(2) : 1;
  const cancelAfter = r() < 0.2 ? pick(6) : undefined;
  return { prompt, images, n, sampling, cancelAfter, bad };
}

async function drive(engine: Engine, job: Job): Promise<Outcome> {
  const out: Outcome = {
    job,
    tokens: Array.from({ length: job.n }, () => []),
    logprobs: Array.from({ length: job.n }, () => 0),
    finishes: Array.from({ length: job.n }, () => undefined),
    afterFinish: 0,
  };
  const gen = engine.generate({ prompt: job.prompt, images: job.images, n: job.n, sampling: job.sampling });
  if (job.cancelAfter === 0) gen.cancel();
  let events = 0;
  for await (const ev of gen) {
    if (out.finishes[ev.index]) out.afterFinish++;
    out.tokens[ev.index]!.push(...ev.tokens);
    out.logprobs[ev.index]! += ev.logprobs?.length ?? 0;
    if (ev.finish) out.finishes[ev.index] = ev.finish;
    if (++events === job.cancelAfter) gen.cancel();
  }
  return out;
}

async function soak(t: Test, options: EngineOptions, seed: number): Promise<void> {
  const engine = new Engine(options);
  t.teardown(() => engine.close());
  const r = rng(seed);
  const jobs = Array.from({ length: REQUESTS }, (_, i) => makeJob(r, engine.info.mediaMarker, i));
  // Arrivals: bursts of 1-6 requests started in one turn, each burst after a short random pause.
  const running: Promise<Outcome>[] = [];
  for (let next = 0; next < jobs.length;) {
    const burst = 1 + Math.floor(r() * 6);
    for (let k = 0; k < burst && next < jobs.length; k++) running.push(drive(engine, jobs[next++]!));
    await new Promise((res) => setTimeout(res, Math.floor(r() * 15)));
  }
  const outcomes = await Promise.all(running);
  const sharedPool = engine.info.kvCache.layout === 'unified';

  let problems = 0;
  const fail = (what: string): void => {
    if (problems++ < 10) t.fail(what);
  };
  const reasons = new Map<string, number>();
  outcomes.forEach((o, i) => {
    const { job } = o;
    if (o.afterFinish) fail(`request ${i}: ${o.afterFinish} events after a choice finished`);
    o.finishes.forEach((f, c) => {
      if (!f) return fail(`request ${i} choice ${c}: never finished`);
      reasons.set(f.reason, (reasons.get(f.reason) ?? 0) + 1);
      const got = o.tokens[c]!.length;
      if (job.bad) {
        // Refused, unless cancelled before the refusal came.
        const ok = f.reason === 'error' || (f.reason === 'abort' && job.cancelAfter !== undefined);
        if (!ok || got !== 0) fail(`request ${i}: a bad prompt ended '${f.reason}' after ${got} tokens`);
        return;
      }
      if (f.reason === 'error') return fail(`request ${i} choice ${c}: error ${f.error}`);
      if (f.completionTokens !== got) fail(`request ${i} choice ${c}: reports ${f.completionTokens} tokens, sent ${got}`);
      // n choices that cannot all reach max_tokens in a shared pool stop at their share of it.
      const share = job.n > 1 && sharedPool ? Math.floor((engine.info.nCtx - f.promptTokens) / job.n) : Infinity;
      const want = Math.min(job.sampling.maxTokens, share);
      if (job.cancelAfter === undefined && (f.reason !== 'length' || got !== want)) {
        fail(`request ${i} choice ${c}: '${f.reason}' after ${got} of ${want} tokens`);
      }
      if (f.reason === 'abort' && job.cancelAfter === undefined) fail(`request ${i} choice ${c}: aborted, not cancelled`);
      if (job.sampling.logprobs >= 0 && o.logprobs[c] !== got) fail(`request ${i} choice ${c}: ${o.logprobs[c]} log-probabilities for ${got} tokens`);
    });
  });
  t.equal(problems, 0, `${REQUESTS} requests, ${problems} problems; finishes ${JSON.stringify(Object.fromEntries(reasons))}`);
  const s = engine.stats();
  t.same({ kvUsedCells: s.kvUsedCells, running: s.running, waiting: s.waiting, live: engine.liveCount }, { kvUsedCells: 0, running: 0, waiting: 0, live: 0 }, 'nothing left');
  t.comment(`preemptions ${s.preemptions}, image cache hits ${s.imageCacheHits}, largest batch ${s.maxBatchSeqs} sequences`);
}

t.test(`engine soak (seed ${SEED}, CAPRL_SOAK_SEED to repeat)`, async (t) => {
  const { model, mmproj } = await tinyModel();
  const base = { model, mmproj, maxSeqs: 6, nThreads: 2, nSamplingThreads: 3, logLevel: 'error' };
  t.test('one shared pool, small: preemption, 64-token steps, image cache on', async (t) => {
    await soak(t, { ...base, nCtx: 512, nBatch: 64, imageCacheBytes: 64 << 20 }, SEED);
  });
  t.test('a stream per sequence, image cache off', async (t) => {
    await soak(t, { ...base, nCtx: 6 * 512, maxModelLen: 512, nBatch: 128, imageCacheBytes: 0 }, SEED + 1);
  });
  t.test('our batched vision encoder, shared pool, image cache off', async (t) => {
    await soak(t, { ...base, nCtx: 1024, nBatch: 128, imageCacheBytes: 0, visionEncoder: 'caprl' }, SEED + 2);
  });
});
