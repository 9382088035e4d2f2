// The native engine on the tiny model, in-process: continuous batching must not change any
// request's greedy tokens, cancellation frees KV cells, and each sampling control does its job.
import t from 'tap';
import { getEventListeners } from 'node:events';
import { Engine, type EngineEvent, type SamplingParams } from '../src/engine/engine.js';
import { greedy as greedyFor } from './helpers/engine-inputs.js';
import { tinyModel } from './helpers/models.js';

const greedy = (over: Partial<SamplingParams> = {}): SamplingParams => greedyFor(24, over);

interface Result {
  tokens: number[];
  text: string;
  events: EngineEvent[];
  finish: NonNullable<EngineEvent['finish']>;
}

async function collect(engine: Engine, prompt: string, sampling: SamplingParams, onFirst?: () => void): Promise<Result> {
  return (await collectChoices(engine, prompt, sampling, 1, onFirst))[0];
}

/** One Result per choice of an n-choice request. */
async function collectChoices(engine: Engine, prompt: string, sampling: SamplingParams, n: number, onFirst?: () => void): Promise<Result[]> {
  const gen = engine.generate({ prompt, images: [], sampling, n });
  const rs: Result[] = Array.from({ length: n }, () => ({ tokens: [], text: '', events: [], finish: undefined as never }));
  let seen = 0;
  for await (const ev of gen) {
    if (seen++ === 0) onFirst?.();
    const r = rs[ev.index];
    r.events.push(ev);
    r.tokens.push(...ev.tokens);
    r.text += ev.text;
    if (ev.finish) r.finish = ev.finish;
  }
  return rs;
}

const prompts = Array.from({ length: 8 }, (_, i) =>
  `<|im_start|>user\nPlease describe image number ${i} in detail, ${'with care '.repeat(i)}<|im_end|>\n<|im_start|>assistant\n`);

t.test('engine on the tiny model', async (t) => {
  const { model, mmproj } = await tinyModel();
  const engine = new Engine({ model, mmproj, nCtx: 4096, maxSeqs: 8, nBatch: 512, nThreads: 2, logLevel: 'error' });
  t.teardown(() => engine.close());

  t.test('info describes the model', async (t) => {
    t.ok(engine.info.hasVision, 'mmproj loaded');
    t.match(engine.info.chatTemplate, /im_start/);
    t.equal(engine.info.nCtx, 4096);
    t.ok(engine.info.devices.length > 0);
    t.equal(engine.info.maxSeqs, 8);
    t.ok(engine.info.nLayers > 1);
    t.equal(engine.info.nGpuLayers, 0, 'a CPU build offloads nothing');
  });

  t.test('8 concurrent requests share decode steps and match their solo greedy tokens', async (t) => {
    const solo: Result[] = [];
    for (const p of prompts) solo.push(await collect(engine, p, greedy()));
    for (const r of solo) {
      t.equal(r.tokens.length, 24, 'ignore_eos gives exactly max_tokens');
      t.equal(r.finish.reason, 'length');
    }
    t.ok(new Set(solo.map((r) => r.tokens.join(','))).size > 1, 'different prompts give different outputs');

    const before = engine.stats();
    const together = await Promise.all(prompts.map((p) => collect(engine, p, greedy())));
    const after = engine.stats();
    for (let i = 0; i < prompts.length; i++) {
      t.same(together[i].tokens, solo[i].tokens, `request ${i}: same tokens alone and among 8`);
      t.equal(together[i].text, solo[i].text);
    }
    t.equal(after.maxBatchSeqs, 8, 'some step decoded all 8 sequences in one batch');
    const steps = after.steps - before.steps;
    const decoded = after.decodedSeqsTotal - before.decodedSeqsTotal;
    // Submitted in one JS turn, the 8 are handed to the engine thread together and admitted in
    // one step: 1 prefill step + 23 decode steps, whatever the threads' timing.
    t.equal(steps, 24, `one burst: ${steps} steps for ${decoded} decoded tokens`);
    t.equal(after.kvUsedCells, 0, 'all KV cells freed');
    t.equal(after.running, 0);
  });

  t.test('cancel ends a request with abort and frees its cells at once', async (t) => {
    let gen: ReturnType<Engine['generate']> | undefined;
    const events: EngineEvent[] = [];
    gen = engine.generate({ prompt: prompts[0], images: [], sampling: greedy({ maxTokens: -1 }) });
    for await (const ev of gen) {
      events.push(ev);
      if (events.length === 2) gen.cancel();
    }
    const last = events[events.length - 1];
    t.equal(last.finish?.reason, 'abort');
    t.ok(last.finish!.completionTokens < 1000, `stopped after ${last.finish!.completionTokens} tokens`);
    const s = engine.stats();
    t.equal(s.kvUsedCells, 0);
    t.equal(s.running, 0);
  });

  t.test('a long-lived abort signal does not keep finished generations', async (t) => {
    const ac = new AbortController();
    const listeners = () => getEventListeners(ac.signal, 'abort').length;
    for (let i = 0; i < 12; i++) {
      for await (const ev of engine.generate({ prompt: prompts[7], images: [], sampling: greedy({ maxTokens: 2 }) }, ac.signal)) void ev;
    }
    t.equal(listeners(), 0, 'no abort listener left on the signal');
  });

  t.test('max_tokens, stop strings, stop token ids, min_tokens', async (t) => {
    const base = await collect(engine, prompts[1], greedy({ maxTokens: 16 }));
    t.equal(base.tokens.length, 16);

    // A stop string taken from the middle of the greedy text cuts the output just before it.
    const text = base.text;
    const cut = Math.floor(text.length / 2);
    const stop = text.slice(cut, cut + 3);
    const stopped = await collect(engine, prompts[1], greedy({ maxTokens: 16, stop: [stop] }));
    t.equal(stopped.finish.reason, 'stop');
    t.equal(stopped.finish.stoppedBy, stop);
    t.equal(stopped.text, text.slice(0, text.indexOf(stop)), 'text ends right before the stop string');

    const byId = await collect(engine, prompts[1], greedy({ maxTokens: 16, stopTokenIds: [base.tokens[5]] }));
    const firstAt = base.tokens.indexOf(base.tokens[5]);
    t.equal(byId.finish.reason, 'stop');
    t.equal(byId.finish.stoppedBy, base.tokens[5]);
    t.same(byId.tokens, base.tokens.slice(0, firstAt), 'stops at the first occurrence, stop token not included');

    const minTok = await collect(engine, prompts[1], greedy({ maxTokens: 16, stopTokenIds: [base.tokens[0]], minTokens: 3 }));
    t.ok(minTok.tokens.length >= 3, 'min_tokens keeps generating past a stop token id');
  });

  t.test('seeded sampling is reproducible, greedy logprobs are the top choice', async (t) => {
    const s = (seed: number) => greedy({ temperature: 1.0, seed, maxTokens: 12 });
    const a = await collect(engine, prompts[2], s(7));
    const b = await collect(engine, prompts[2], s(7));
    const c = await collect(engine, prompts[2], s(8));
    t.same(a.tokens, b.tokens, 'same seed, same tokens');
    t.notSame(a.tokens, c.tokens, 'another seed, other tokens');

    const lp = await collect(engine, prompts[2], greedy({ maxTokens: 4, logprobs: 3 }));
    const all = lp.events.flatMap((e) => e.logprobs ?? []);
    t.equal(all.length, 4);
    for (const l of all) {
      t.equal(l.top.length, 3);
      t.equal(l.top[0].token, l.token, 'greedy picks the most likely token');
      t.ok(l.logprob <= 0 && l.top[0].logprob >= l.top[1].logprob && l.top[1].logprob >= l.top[2].logprob);
    }
  });

  t.test('penalties change greedy output', async (t) => {
    const plain = await collect(engine, prompts[3], greedy({ maxTokens: 24 }));
    const pen = await collect(engine, prompts[3], greedy({ maxTokens: 24, repetitionPenalty: 1.8, frequencyPenalty: 1.5 }));
    t.notSame(pen.tokens, plain.tokens);
    t.ok(new Set(pen.tokens).size >= new Set(plain.tokens).size, 'penalties do not reduce token variety');
  });

  t.test('n choices share one prefill', async (t) => {
    const solo = await collect(engine, prompts[4], greedy({ maxTokens: 16 }));
    const before = engine.stats();
    const four = await collectChoices(engine, prompts[4], greedy({ maxTokens: 16 }), 4);
    const after = engine.stats();
    t.equal(after.promptTokensTotal - before.promptTokensTotal, four[0].finish.promptTokens, 'the prompt was prefilled once');
    for (const r of four) {
      t.same(r.tokens, solo.tokens, 'greedy choices equal the single greedy answer');
      t.equal(r.finish.reason, 'length');
    }

    const sampled = (seed: number) => collectChoices(engine, prompts[4], greedy({ temperature: 1, seed, maxTokens: 12 }), 3);
    const a = await sampled(11);
    const b = await sampled(11);
    t.same(a.map((r) => r.tokens), b.map((r) => r.tokens), 'seeded choices are reproducible');
    t.equal(new Set(a.map((r) => r.tokens.join(','))).size, 3, 'each choice samples its own stream');
    t.equal(engine.stats().kvUsedCells, 0, 'all cells freed');

    const tooMany = await collectChoices(engine, prompts[4], greedy(), 9);
    for (const r of tooMany) {
      t.equal(r.finish.reason, 'error');
      t.match(r.finish.error, /n must be between 1 and 8/);
    }
  });

  t.test('cancel during an n=3 request ends every choice', async (t) => {
    const gen = engine.generate({ prompt: prompts[5], images: [], sampling: greedy({ maxTokens: -1 }), n: 3 });
    const finishes: string[] = [];
    let events = 0;
    for await (const ev of gen) {
      if (++events === 3) gen.cancel();
      if (ev.finish) finishes.push(ev.finish.reason);
    }
    t.same(finishes, ['abort', 'abort', 'abort']);
    t.equal(engine.stats().kvUsedCells, 0);
  });

  t.test('running sequences keep decoding while an image is encoded', async (t) => {
    const text = engine.generate({ prompt: prompts[6], images: [], sampling: greedy({ maxTokens: 1500 }) });
    let textTokens = 0;
    const textDone = (async () => { for await (const ev of text) textTokens += ev.tokens.length; })();
    while (textTokens === 0) await new Promise((r) => setTimeout(r, 5));
    // 840x840 is 900 image tokens: long enough to encode that a blocked decode loop would show.
    const W = 840, H = 840;
    const rgb = Buffer.alloc(W * H * 3);
    for (let i = 0; i < rgb.length; i++) rgb[i] = (i * 7919) & 255;
    const before = textTokens;
    let during = -1;
    const img = engine.generate({
      prompt: `<|im_start|>user\n${engine.info.mediaMarker}Please describe this image in detail<|im_end|>\n<|im_start|>assistant\n`,
      images: [{ width: W, height: H, rgb }],
      sampling: greedy({ maxTokens: 4 }),
    });
    let finish: EngineEvent['finish'];
    for await (const ev of img) {
      if (during < 0 && ev.tokens.length > 0) during = textTokens - before;
      if (ev.finish) finish = ev.finish;
    }
    text.cancel();
    await textDone;
    t.equal(finish?.reason, 'length');
    t.ok(finish!.promptTokens > 900, `image prompt has ${finish!.promptTokens} tokens`);
    t.ok(during >= 20, `${during} tokens of the other request were decoded before the image request's first token`);
  });

  t.test('an image seen before is not encoded again (embedding cache)', async (t) => {
    const W = 224, H = 168;
    const rgb = Buffer.alloc(W * H * 3);
    for (let i = 0; i < rgb.length; i++) rgb[i] = (i * 31) & 255;
    const other = Buffer.from(rgb);
    other[0] ^= 1;  // one pixel differs: another image
    const prompt = `<|im_start|>user\n${engine.info.mediaMarker}Please describe this image in detail<|im_end|>\n<|im_start|>assistant\n`;
    const caption = async (pixels: Buffer) => {
      let tokens: number[] = [];
      for await (const ev of engine.generate({ prompt, images: [{ width: W, height: H, rgb: pixels }], sampling: greedy({ maxTokens: 8 }) })) {
        tokens = tokens.concat(ev.tokens);
      }
      return tokens;
    };
    const s0 = engine.stats();
    const first = await caption(rgb);
    const s1 = engine.stats();
    const second = await caption(Buffer.from(rgb));
    const s2 = engine.stats();
    await caption(other);
    const s3 = engine.stats();
    t.equal(s1.imageCacheMisses - s0.imageCacheMisses, 1, 'first sight: encoded');
    t.equal(s2.imageCacheHits - s1.imageCacheHits, 1, 'same pixels again: from the cache');
    t.same(second, first, 'cached embeddings give the same caption');
    t.equal(s3.imageCacheMisses - s2.imageCacheMisses, 1, 'one pixel changed: encoded');
  });

  t.test('preemption: more demand than KV cells, every request still completes', async (t) => {
    // A pool of 512 cells for 4 requests that each grow to ~230: the youngest are preempted
    // (cells freed) and resume by prefilling their prompt and output again.
    const small = new Engine({ model, mmproj, nCtx: 512, maxSeqs: 4, nBatch: 512, nThreads: 2, logLevel: 'error' });
    t.teardown(() => small.close());
    const rs = await Promise.all(prompts.slice(0, 4).map(async (p) => {
      const r: Result = { tokens: [], text: '', events: [], finish: undefined as never };
      for await (const ev of small.generate({ prompt: p, images: [], sampling: greedy({ maxTokens: 200 }) })) {
        r.tokens.push(...ev.tokens);
        r.text += ev.text;
        if (ev.finish) r.finish = ev.finish;
      }
      return r;
    }));
    const s = small.stats();
    t.ok(s.preemptions > 0, `${s.preemptions} preemptions`);
    for (const r of rs) {
      t.equal(r.finish.reason, 'length');
      t.equal(r.tokens.length, 200, 'no token lost or repeated across a preemption');
      t.equal(r.finish.completionTokens, 200);
    }
    t.equal(s.kvUsedCells, 0);
    t.equal(s.running, 0);
  });

  t.test('a prompt longer than the context is an error, not a crash', async (t) => {
    const r = await collect(engine, 'word '.repeat(5000), greedy());
    t.equal(r.finish.reason, 'error');
    t.match(r.finish.error, /maximum context length/);
  });
});
