// Prompts prepared on their own thread ahead of admission (native/prompt-prep.cpp), on the tiny
// model: admission keeps arrival order, preparation errors end their request as errors, a
// request cancelled while prepared or waiting ends as aborted, shutdown ends everything queued,
// and a request that waits for KV cells is prepared once. Nothing here depends on speed.
import t from 'tap';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { Engine, type EngineEvent, type EngineImage } from '../src/engine/engine.js';
import { greedy, patternImage as image } from './helpers/engine-inputs.js';
import { tinyModel } from './helpers/models.js';

type Finish = NonNullable<EngineEvent['finish']>;

const chat = (text: string) => `<|im_start|>user\n${text}<|im_end|>\n<|im_start|>assistant\n`;

/** Starts a request; `done` resolves with its finishes by choice; `order` gets its id at its last finish. */
function start(engine: Engine, prompt: string, images: EngineImage[], maxTokens: number, order: number[] = [], tag = 0, n = 1) {
  const gen = engine.generate({ prompt, images, n, sampling: greedy(maxTokens) });
  const done = (async () => {
    const finishes: Finish[] = [];
    const tokens: number[] = [];
    for await (const ev of gen) {
      tokens.push(...ev.tokens);
      if (ev.finish) finishes[ev.index] = ev.finish;
    }
    order.push(tag);
    return { finishes, tokens };
  })();
  return { gen, done };
}

t.test('prompt preparation', async (t) => {
  const { model, mmproj } = await tinyModel();

  t.test('one sequence slot: requests run in arrival order, however long each takes to prepare', async (t) => {
    const engine = new Engine({ model, mmproj, nCtx: 4096, maxSeqs: 1, nBatch: 512, nThreads: 1, logLevel: 'none' });
    t.teardown(() => engine.close());
    const m = engine.info.mediaMarker;
    // A 1036x1036 image takes far longer to prepare than a text prompt: admission must still take
    // them in order (with one slot, finishes arrive in admission order). A bad prompt needs no
    // slot: it is answered as soon as it reaches the head of the line, while request 1 still runs
    // (60 tokens: time enough for request 2 to be prepared once request 1 is admitted; with 2
    // tokens it raced the preparation and sometimes finished first).
    const order: number[] = [];
    const runs = [
      start(engine, chat(`${m}Describe.`), [image(1036, 3)], 2, order, 0),
      start(engine, chat('text one'), [], 60, order, 1),
      start(engine, chat('no marker for this image'), [image(56, 5)], 2, order, 2),
      start(engine, chat(`${m}A small one.`), [image(56, 7)], 2, order, 3),
      start(engine, chat('text two'), [], 2, order, 4),
    ];
    const results = await Promise.all(runs.map((r) => r.done));
    t.same(order, [0, 2, 1, 3, 4], 'good requests finished in arrival order; the bad one at once when it came up');
    t.same(results.map((r) => r.finishes[0]!.reason), ['length', 'length', 'error', 'length', 'length']);
    t.match(results[2]!.finishes[0]!.error, /different number of image markers \(0\) than images \(1 images\)/);
  });

  t.test('preparation errors end their request (every choice) as errors; the rest run unchanged', async (t) => {
    const engine = new Engine({ model, mmproj, nCtx: 4096, maxSeqs: 4, nBatch: 512, nThreads: 1, logLevel: 'none' });
    t.teardown(() => engine.close());
    const m = engine.info.mediaMarker;
    const good = chat('a good request');
    const alone = (await start(engine, good, [], 12).done).tokens;
    const img = image(56, 11);
    const bad: [string, EngineImage[], RegExp][] = [
      [chat(`${m} but no image`), [], /different number of image markers \(1\) than images \(0 images\)/],
      [chat('an image but no marker'), [img], /different number of image markers \(0\) than images \(1 images\)/],
      [chat(`${m}${m}two markers`), [img], /different number of image markers \(2\) than images \(1 images\)/],
      [chat(`${m}short buffer`), [{ width: 56, height: 56, rgb: Buffer.alloc(10) }], /image buffer does not match its size/],
      ['', [], /the prompt is empty/],
      [chat('word '.repeat(5000)), [], /maximum context length/],
    ];
    const goods = [0, 1, 2].map(() => start(engine, good, [], 12));
    const bads = bad.map(([p, images], i) => start(engine, p, images, 4, [], 0, 1 + (i % 3)));
    for (let i = 0; i < bad.length; i++) {
      const r = await bads[i]!.done;
      t.equal(r.finishes.length, 1 + (i % 3), `bad request ${i}: a finish per choice`);
      for (const f of r.finishes) {
        t.equal(f.reason, 'error');
        t.match(f.error, bad[i]![2]);
        t.equal(f.completionTokens, 0);
      }
    }
    for (const g of goods) t.same((await g.done).tokens, alone, 'a good request beside them: its tokens alone');
    // A prompt that ends right at its image marker: mtmd closes the image with <|vision_end|>
    // text, so the prompt still ends with text and runs.
    const endsAtImage = await start(engine, `<|im_start|>user\nends with an image${m}`, [img], 3).done;
    t.equal(endsAtImage.finishes[0]!.reason, 'length', 'a prompt ending at its image runs');
    t.equal(endsAtImage.tokens.length, 3);
    t.equal(engine.stats().kvUsedCells, 0);
  });

  t.test('cancelled while queued, being prepared or prepared: abort; the others complete', async (t) => {
    const engine = new Engine({ model, mmproj, nCtx: 4096, maxSeqs: 2, nBatch: 512, nThreads: 1, logLevel: 'none' });
    t.teardown(() => engine.close());
    const m = engine.info.mediaMarker;
    // 2 slots, 10 image requests: while the first two run, the next ones wait, some handed to
    // the prep thread, some not yet. Every other one is cancelled, at once or a little later.
    const runs = Array.from({ length: 10 }, (_, i) => start(engine, chat(`${m}Image ${i}.`), [image(448, 17 + i)], 6));
    runs[1]!.gen.cancel();
    runs[3]!.gen.cancel();
    await new Promise((r) => setImmediate(r));
    runs[5]!.gen.cancel();
    await new Promise((r) => setTimeout(r, 5));
    runs[7]!.gen.cancel();
    runs[9]!.gen.cancel();
    const results = await Promise.all(runs.map((r) => r.done));
    for (let i = 0; i < results.length; i++) {
      const f = results[i]!.finishes[0]!;
      if (i % 2 === 1) t.ok(f.reason === 'abort' || f.reason === 'length', `request ${i} ended (${f.reason})`);
      else t.equal(f.reason, 'length', `request ${i} completed`);
      if (f.reason === 'length') t.equal(results[i]!.tokens.length, 6);
    }
    t.equal(results[1]!.finishes[0]!.reason, 'abort', 'cancelled before the engine saw it');
    const s = engine.stats();
    t.same([s.running, s.waiting, s.kvUsedCells], [0, 0, 0]);
  });

  t.test('shutdown with requests queued and being prepared: every one ends, close returns', async (t) => {
    const engine = new Engine({ model, mmproj, nCtx: 4096, maxSeqs: 1, nBatch: 512, nThreads: 1, logLevel: 'none' });
    const m = engine.info.mediaMarker;
    const runs = [start(engine, chat('hold the slot'), [], -1)];
    for (let i = 0; i < 6; i++) runs.push(start(engine, chat(`${m}Image ${i}.`), [image(1036, 31 + i)], 4));
    await new Promise((r) => setTimeout(r, 20));
    await engine.close();
    const results = await Promise.all(runs.map((r) => r.done));
    t.equal(results[0]!.finishes[0]!.reason, 'abort', 'the running request');
    for (const r of results.slice(1)) t.ok(['abort', 'length'].includes(r.finishes[0]!.reason), 'each queued request ended');
    t.throws(() => engine.generate({ prompt: chat('late'), images: [], sampling: greedy(1) }), /closed/);
  });

  t.test('a request that waits for KV cells is prepared once', async (t) => {
    // In a child process, so that the engine's stderr can be read: preparing the image request a
    // second time (its image already handed over) would log mtmd's marker/bitmap mismatch.
    const script = fileURLToPath(new URL('./helpers/prep-once-child.js', import.meta.url));
    const child = spawn(process.execPath, [script, model, mmproj], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    const code = await new Promise<number | null>((r) => child.on('close', r));
    t.equal(code, 0, stderr);
    const out = JSON.parse(stdout) as { reasons: string[]; waited: boolean };
    t.same(out.reasons, ['length', 'length']);
    t.ok(out.waited, 'the image request was prepared before it could be admitted');
    t.notMatch(stderr, /mtmd_tokenize/, 'no second preparation');
  });
});

t.test("a waiting request's images are encoded before it is admitted", async (t) => {
  // One sequence slot, held by a long text request: the image request waits, prepared, and its
  // image goes to the vision worker meanwhile (the worker counts it as a cache miss at hand-over).
  const { model, mmproj } = await tinyModel();
  const engine = new Engine({ model, mmproj, visionEncoder: 'caprl', nCtx: 4096, maxSeqs: 1, nBatch: 512, nThreads: 1, logLevel: 'error' });
  t.teardown(() => engine.close());
  const chat = (text: string) => `<|im_start|>user\n${text}<|im_end|>\n<|im_start|>assistant\n`;
  const holder = engine.generate({ prompt: chat('hold the slot'), images: [], sampling: greedy(3000) });
  const pictured = engine.generate({ prompt: chat(`${engine.info.mediaMarker}Describe.`), images: [image(448, 41)], sampling: greedy(4) });
  let queuedWhileWaiting = false;
  const holderDone = (async () => {
    for await (const ev of holder) {
      const s = engine.stats();
      if (!queuedWhileWaiting && s.waiting === 1 && s.running === 1 && s.imageCacheMisses === 1) {
        queuedWhileWaiting = true;
        holder.cancel();
      }
      if (ev.finish) return ev.finish.reason;
    }
    return undefined;
  })();
  let imageFinish: string | undefined;
  let encode = 0;
  for await (const ev of pictured) {
    if (ev.finish) {
      imageFinish = ev.finish.reason;
      encode = ev.finish.timings?.imageEncode ?? 0;
    }
  }
  t.ok(queuedWhileWaiting, 'its image was handed to the vision worker while it waited for the slot');
  t.equal(await holderDone, 'abort');
  t.equal(imageFinish, 'length', 'then admitted, it ran to its end');
  t.ok(encode > 0, `its image was encoded (${encode} s)`);
  t.equal(engine.stats().imageCacheMisses, 1, 'once');
});
