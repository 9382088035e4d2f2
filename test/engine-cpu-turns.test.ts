// With the model and the vision encoder both on the CPU, they take turns with every thread (the
// engine thread runs the encoder passes between its steps) instead of splitting the cores: the
// engine reports the threads and the turns, a decoding request waits while an image is encoded,
// and decode steps do not block more once images have been encoded. Nothing here depends on speed.
import t from 'tap';
import { Engine } from '../src/engine/engine.js';
import { greedy, patternImage } from './helpers/engine-inputs.js';
import { tinyModel } from './helpers/models.js';
import { voluntarySwitches } from './helpers/thread-switches.js';

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

  // The step cost of issue 21: once an image had been encoded on a thread of its own, every later
  // decode step (of any request) blocked at each barrier of its graph, because a second OpenMP team
  // put more OpenMP threads than cores in the process. Counted as the process's voluntary context
  // switches per decode step, an image request's against a text request's in the same engine.
  for (const visionEncoder of ['llama.cpp', 'caprl'] as const) {
    t.test(`${visionEncoder}: decode steps block no more after an image than before`, async (t) => {
      const engine = new Engine({ model, mmproj, nCtx: 8192, maxSeqs: 2, nBatch: 512, nThreads: 2, imageCacheBytes: 0, visionEncoder, logLevel: 'none' });
      t.teardown(() => engine.close());
      const m = engine.info.mediaMarker;
      // Switches per step over a request's decode steps after its 8th token (its prefill and
      // encode done), one request at a time.
      const perStep = async (prompt: string, images: ReturnType<typeof patternImage>[]) => {
        let seen = 0;
        let from: { switches: number; steps: number } | undefined;
        for await (const ev of engine.generate({ prompt, images, n: 1, sampling: greedy(128) })) {
          seen += ev.tokens.length;
          if (!from && seen >= 8) from = { switches: voluntarySwitches(), steps: engine.stats().steps };
        }
        const steps = engine.stats().steps - from!.steps;
        return (voluntarySwitches() - from!.switches) / steps;
      };
      const before = await perStep(chat('Describe.'), []);
      const image = await perStep(chat(`${m}Describe.`), [patternImage(448, 5)]);
      const after = await perStep(chat('Describe.'), []);
      t.comment(`voluntary switches per decode step: text ${before.toFixed(2)}, image ${image.toFixed(2)}, text after ${after.toFixed(2)}`);
      t.ok(image <= before + 5, `an image request's decode steps block as often as a text request's (${image.toFixed(2)} vs ${before.toFixed(2)} per step)`);
      t.ok(after <= before + 5, `a text request after an image one blocks as often as before it (${after.toFixed(2)} vs ${before.toFixed(2)} per step)`);
    });
  }

  // As llama-server: on a shared CPU every queued image is encoded before the next step, so a burst
  // of image requests starts decoding together instead of each first request being stalled by the
  // encoder passes of the ones behind it (one pass per step, alternating, did that).
  t.test('llama.cpp: a burst of image requests is encoded before any of them decodes on', async (t) => {
    const engine = new Engine({ model, mmproj, nCtx: 8192, maxSeqs: 4, nBatch: 2048, nThreads: 2, imageCacheBytes: 0, logLevel: 'none' });
    t.teardown(() => engine.close());
    const m = engine.info.mediaMarker;
    const order: string[] = [];  // 'first' or 'more', per token event, in arrival order
    await Promise.all([1, 2, 3, 4].map(async (seed) => {
      let seen = 0;
      for await (const ev of engine.generate({ prompt: chat(`${m}Describe.`), images: [patternImage(224, seed)], n: 1, sampling: greedy(8) })) {
        for (let i = 0; i < ev.tokens.length; i++) order.push(seen++ === 0 ? 'first' : 'more');
      }
    }));
    t.equal(order.filter((o) => o === 'first').length, 4);
    t.equal(order.indexOf('more'), 4, `every request's first token came before any second token (${order.slice(0, 8).join(' ')} ...)`);
  });
});
