// With the model and the vision encoder both on the CPU, they take turns with every thread
// (native/cpu-turns.h) instead of splitting the cores: the engine reports the threads and the
// turns, and a decoding request waits while an image is encoded. Nothing here depends on speed.
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
    await text.close();
  });

  for (const visionEncoder of ['llama.cpp', 'caprl'] as const) {
    t.test(`${visionEncoder}: a decoding request waits while an image is encoded, then goes on`, async (t) => {
      const engine = new Engine({ model, mmproj, nCtx: 8192, maxSeqs: 2, nBatch: 512, nThreads: 2, imageCacheBytes: 0, visionEncoder, logLevel: 'none' });
      t.teardown(() => engine.close());
      t.equal(engine.stats().cpuWaitSeconds, 0, 'no wait before any image');
      // A long text request decodes step after step; an image request arrives once it has started.
      const long = engine.generate({ prompt: chat('Count.'), images: [], n: 1, sampling: greedy(6000) });
      const longDone = (async () => {
        let tokens = 0;
        let reason = '';
        for await (const ev of long) {
          tokens += ev.tokens.length;
          if (ev.finish) reason = ev.finish.reason;
        }
        return { tokens, reason };
      })();
      const generated = async (n: number) => {
        while (engine.stats().generationTokensTotal < n) await new Promise((r) => setTimeout(r, 5));
      };
      await generated(8);

      const m = engine.info.mediaMarker;
      let imageTokens = 0;
      let encodeSeconds = 0;
      for await (const ev of engine.generate({ prompt: chat(`${m}Describe.`), images: [patternImage(1036, 3)], n: 1, sampling: greedy(4) })) {
        imageTokens += ev.tokens.length;
        if (ev.finish) encodeSeconds = ev.finish.timings?.imageEncode ?? 0;
      }
      const waited = engine.stats().cpuWaitSeconds;
      await generated(engine.stats().generationTokensTotal + 8);  // the text request goes on after the image
      long.cancel();
      const l = await longDone;
      t.equal(imageTokens, 4, 'the image request ran to its length');
      t.equal(l.reason, 'abort', 'the text request was still decoding when the image request ended (cancelled after)');
      t.ok(encodeSeconds > 0, 'the image was encoded');
      // The engine wanted the CPU for the next step all along; the encoder's pass held it.
      t.ok(waited > 0, `the engine thread waited for the encoder's turn (${waited.toFixed(3)} s)`);
    });
  }
});
