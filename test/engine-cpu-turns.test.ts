// With the model and the vision encoder both on the CPU, they take turns with every thread
// (native/cpu-turns.h) instead of splitting the cores: the engine reports the threads and the
// turns, and a decoding request waits while an image is encoded, for one layer of the encoder at
// a time (the pass lets the waiting step in between its layers). Nothing here depends on speed.
import t from 'tap';
import { Engine } from '../src/engine/engine.js';
import { greedy, patternImage } from './helpers/engine-inputs.js';
import { tinyModel } from './helpers/models.js';

const chat = (text: string) => `<|im_start|>user\n${text}<|im_end|>\n<|im_start|>assistant\n`;

t.test('model and vision encoder on the CPU take turns', async (t) => {
  const { model, mmproj } = await tinyModel();

  t.test('threads: every one to each side, by turns; without an mmproj, no turns', async (t) => {
    for (const visionEncoder of ['llama.cpp', 'caprl'] as const) {
      const e = new Engine({ model, mmproj, nCtx: 2048, maxSeqs: 2, nBatch: 512, nThreads: 2, visionEncoder, logLevel: 'none' });
      t.same(e.info.threads, { model: 2, vision: 2, cpuTurns: true }, `${visionEncoder}: both sides get the 2 threads`);
      await e.close();
    }
    const own = new Engine({ model, mmproj, nCtx: 2048, maxSeqs: 2, nBatch: 512, nThreads: 2, nVisionThreads: 1, logLevel: 'none' });
    t.same(own.info.threads, { model: 2, vision: 1, cpuTurns: true }, 'nVisionThreads still sets the vision threads');
    await own.close();
    const text = new Engine({ model, nCtx: 2048, maxSeqs: 2, nBatch: 512, nThreads: 2, logLevel: 'none' });
    t.same(text.info.threads, { model: 2, vision: 0, cpuTurns: false }, 'text only: nothing to take turns with');
    t.equal(text.stats().cpuWaitSeconds, 0);
    t.equal(text.stats().visionYields, 0);
    await text.close();
  });

  // An image request arrives while a long text request decodes step after step; the text request
  // is cancelled once it has gone on for 8 more tokens after the image request ended.
  const imageWhileDecoding = async (engine: Engine) => {
    const long = engine.generate({ prompt: chat('Count.'), images: [], n: 1, sampling: greedy(6000) });
    const longDone = (async () => {
      let reason = '';
      for await (const ev of long) if (ev.finish) reason = ev.finish.reason;
      return reason;
    })();
    const generated = async (n: number) => {
      while (engine.stats().generationTokensTotal < n) await new Promise((r) => setTimeout(r, 5));
    };
    await generated(8);
    let imageTokens = 0;
    let encodeSeconds = 0;
    const m = engine.info.mediaMarker;
    for await (const ev of engine.generate({ prompt: chat(`${m}Describe.`), images: [patternImage(1036, 3)], n: 1, sampling: greedy(4) })) {
      imageTokens += ev.tokens.length;
      if (ev.finish) encodeSeconds = ev.finish.timings?.imageEncode ?? 0;
    }
    const { cpuWaitSeconds, visionYields } = engine.stats();
    await generated(engine.stats().generationTokensTotal + 8);
    long.cancel();
    return { imageTokens, encodeSeconds, textReason: await longDone, waited: cpuWaitSeconds, yields: visionYields };
  };
  const open = (visionEncoder: 'llama.cpp' | 'caprl', visionYieldAfterMs: number) =>
    new Engine({ model, mmproj, nCtx: 8192, maxSeqs: 2, nBatch: 512, nThreads: 2, imageCacheBytes: 0, visionEncoder, visionYieldAfterMs, logLevel: 'none' });

  for (const visionEncoder of ['llama.cpp', 'caprl'] as const) {
    t.test(`${visionEncoder}: a decoding request waits while an image is encoded, a layer at a time, then goes on`, async (t) => {
      // visionYieldAfterMs 0: the pass lets the waiting step in at every layer, whatever the speed.
      const engine = open(visionEncoder, 0);
      t.teardown(() => engine.close());
      t.equal(engine.stats().cpuWaitSeconds, 0, 'no wait before any image');
      const r = await imageWhileDecoding(engine);
      t.equal(r.imageTokens, 4, 'the image request ran to its length');
      t.equal(r.textReason, 'abort', 'the text request was still decoding when the image request ended (cancelled after)');
      t.ok(r.encodeSeconds > 0, 'the image was encoded');
      // The engine wanted the CPU for the next step all along; the encoder's pass held it.
      t.ok(r.waited > 0, `the engine thread waited for the encoder's turn (${r.waited.toFixed(3)} s)`);
      // The tiny tower has 4 layers: the step waiting at each of the first 3 boundaries got in
      // (the last may fall after the merger has started, or after the text request was served).
      t.ok(r.yields >= 3, `the encoder's pass let the waiting engine step in between its layers (${r.yields} times)`);
    });
  }

  t.test('a step that has not waited visionYieldAfterMs is not let in: an hour, never', async (t) => {
    const engine = open('llama.cpp', 3_600_000);
    t.teardown(() => engine.close());
    const r = await imageWhileDecoding(engine);
    t.equal(r.imageTokens, 4);
    t.equal(r.textReason, 'abort');
    t.ok(r.waited > 0, 'the engine waited for the whole pass');
    t.equal(r.yields, 0, 'the pass did not yield');
  });
});
